/**
 * A batch's decisions as a function of what its transaction read: which
 * recipient of which new event is accepted or refused (policy/recipients.ts),
 * what each rate-limit bucket is charged (policy/rate-limit.ts), which events
 * wait for their sender's bucket, and from that the rows to write: deliveries
 * with their cursors, refusals, client rows, and the senders' charges. Pure: no
 * I/O, no clock (`now` comes in); test/unit/plan.test.ts drives it directly.
 */
import type { RecipientReason } from "../errors.ts";
import {
  bucketKey, bucketScope, chargeEvent, fullBucket, limitFor, refill, refilledTokens, type Bucket, type BucketState, type Limit, type RateLimits,
} from "../policy/rate-limit.ts";
import { decideRecipients, type CapabilityBinding, type RecipientDecision, type RecipientFacts } from "../policy/recipients.ts";
import type { AcceptedInput, EventOutcome } from "./types.ts";

/** A client's rate buckets as its row keeps them: `"*"` for all senders together, else by sender. */
export type StoredBuckets = Record<string, [tokens: number, updatedAt: number]>;
export const ALL_SENDERS = "*";

export interface LockedClient {
  readonly id: string;
  readonly cursor: number;
  readonly buckets: StoredBuckets;
}

/** What the transaction read for the decisions (statement 2). */
export interface DecisionInputs {
  /** The addressed clients that exist, locked, by id. */
  readonly clients: ReadonlyMap<string, LockedClient>;
  readonly capabilities: ReadonlyMap<string, CapabilityBinding>;
  readonly blocks: ReadonlyMap<string, { servers: Set<string>; groups: Set<string> }>;
  /** Senders' buckets (rate limits on), read without a lock; a missing one counts as full. */
  readonly senders: BucketState;
}

/** A sender bucket's charge, made by the transaction's last statement. */
export interface SenderCharge {
  readonly key: string;
  readonly limit: Limit;
  /** Tokens the batch's stored deliveries take. */
  readonly charged: number;
  /** Tokens the bucket must hold for the batch's decisions to stand: all its events' candidates. */
  readonly needed: number;
}

/** What statement 3 writes. */
export interface Plan {
  readonly outcomes: EventOutcome[];
  readonly deliveries: { client: string[]; seq: number[]; iss: string[]; jti: string[] };
  readonly refusals: { client: string[]; reason: string[]; iss: string[]; jti: string[] };
  /**
   * New events none of whose recipients is accepted: kept as a record, not with their body
   * (migrations/011), their refusals as JSON [cid, reason] pairs in recipient order, not as rows.
   */
  readonly records: { iss: string[]; jti: string[]; refused: string[] };
  /** Client rows to rewrite: new cursor and, when charged, new buckets. */
  readonly clients: [string, [number] | [number, StoredBuckets]][];
  /** Delayed events, inserted only to learn they were new: taken back, so their redelivery is not a duplicate. */
  readonly takenBack: readonly AcceptedInput[];
  /** Events whose report is due (stored, or a duplicate repeating its stored decision): queued by the commit. */
  readonly reported: { iss: string[]; jti: string[] };
  /** Charged on condition by the last statement (senders read without a lock)… */
  readonly senderCharges: readonly SenderCharge[];
  /** …or written as decided (senders locked). */
  readonly senderBuckets: ReadonlyMap<string, Bucket>;
}

export interface PlanInputs {
  /** The batch, in delivery order. */
  readonly accepted: readonly AcceptedInput[];
  /** Those the insert found new (statement 1). */
  readonly stored: readonly AcceptedInput[];
  readonly read: DecisionInputs;
  /** Rate limits when on. */
  readonly limits: RateLimits | undefined;
  readonly now: number;
}

export type PlanResult =
  | { readonly kind: "plan"; readonly plan: Plan }
  /**
   * The senders' buckets must be read again under a lock (`keys`, sorted) and the
   * batch planned on them: an event met one short, or the last statement could
   * not charge it (the caller asked to lock first).
   */
  | { readonly kind: "lock senders"; readonly keys: readonly string[] };

/**
 * Plans a batch. With `lockedSenders` (the senders' buckets as read under a
 * lock), charges those exactly; without, charges the buckets as read and
 * leaves the charge to the last statement's condition, unless `lockFirst` or a
 * bucket too short for the batch asks for the lock first.
 */
export function planBatch(inputs: PlanInputs, options: { lockFirst: boolean; lockedSenders?: BucketState }): PlanResult {
  const { accepted, stored, read, limits, now } = inputs;
  const facts: RecipientFacts = { knownClients: new Set(read.clients.keys()), capabilities: read.capabilities, blocks: read.blocks };
  const decisions = new Map<AcceptedInput, RecipientDecision>();
  for (const a of stored) decisions.set(a, decideRecipients(a.event.claims, facts));
  let charged = noCharges();
  if (limits) {
    const charges = chargeRateLimits(decisions, limits, now, read, options);
    if (charges.kind === "lock senders") return charges;
    charged = charges.charges;
  }

  const nextSeq = new Map([...read.clients.values()].map((c) => [c.id, c.cursor]));
  const deliveries: Plan["deliveries"] = { client: [], seq: [], iss: [], jti: [] };
  const refusals: Plan["refusals"] = { client: [], reason: [], iss: [], jti: [] };
  const records: Plan["records"] = { iss: [], jti: [], refused: [] };
  for (const [a, decision] of decisions) {
    if (charged.delays.has(a)) continue;
    const { iss, jti } = a.event.claims;
    if (decision.accepted.length === 0) {
      // Nobody here receives it: its body is of no use to anyone, and a peer could fill the disk with it.
      records.iss.push(iss); records.jti.push(jti); records.refused.push(refusalRecord(a, decision));
      continue;
    }
    for (const cid of decision.accepted) {
      const seq = nextSeq.get(cid)! + 1;
      nextSeq.set(cid, seq);
      deliveries.client.push(cid); deliveries.seq.push(seq); deliveries.iss.push(iss); deliveries.jti.push(jti);
    }
    for (const r of decision.refused) {
      refusals.client.push(r.cid); refusals.reason.push(r.reason); refusals.iss.push(iss); refusals.jti.push(jti);
    }
  }
  const clients: Plan["clients"] = [];
  for (const c of read.clients.values()) {
    const seq = nextSeq.get(c.id)!;
    const buckets = charged.clientBuckets.get(c.id);
    if (seq !== c.cursor || buckets !== undefined) clients.push([c.id, buckets === undefined ? [seq] : [seq, buckets]]);
  }
  const reported: Plan["reported"] = { iss: [], jti: [] };
  const outcomes = accepted.map((a): EventOutcome => {
    const decision = decisions.get(a);
    const wait = charged.delays.get(a);
    if (wait !== undefined) return { streamSeq: a.streamSeq, status: "delayed", waitSeconds: wait };
    reported.iss.push(a.event.claims.iss);
    reported.jti.push(a.event.claims.jti);
    return decision ? { streamSeq: a.streamSeq, status: "stored", decision } : { streamSeq: a.streamSeq, status: "duplicate" };
  });
  return {
    kind: "plan",
    plan: {
      outcomes, deliveries, refusals, records, clients, takenBack: [...charged.delays.keys()], reported,
      senderCharges: charged.senderCharges, senderBuckets: charged.senderBuckets,
    },
  };
}

interface Charges {
  /** Events over their sender's limit, to redeliver after this many seconds. */
  readonly delays: Map<AcceptedInput, number>;
  readonly senderCharges: SenderCharge[];
  readonly senderBuckets: Map<string, Bucket>;
  /** New buckets of the clients charged, in their stored form. */
  readonly clientBuckets: Map<string, StoredBuckets>;
}

const noCharges = (): Charges => ({ delays: new Map(), senderCharges: [], senderBuckets: new Map(), clientBuckets: new Map() });

/**
 * Charges the buckets of every candidate delivery, in batch order, and moves
 * rate-limited recipients into the refusals (`decisions` is updated). Yields
 * the events to delay (over their sender's limit and not yet waiting longer
 * than allowed), with how long; the senders' charges, left to the last
 * statement unless their buckets were locked (then their new state); and the
 * new buckets of the clients charged, for their row's update. Client rows are
 * locked already, so their buckets are exact.
 */
function chargeRateLimits(
  decisions: Map<AcceptedInput, RecipientDecision>,
  limits: RateLimits,
  now: number,
  read: DecisionInputs,
  options: { lockFirst: boolean; lockedSenders?: BucketState },
): { kind: "charges"; charges: Charges } | { kind: "lock senders"; keys: readonly string[] } {
  const before: BucketState = new Map(read.senders);
  const senders = new Map<string, string>();
  for (const [a, d] of decisions) {
    if (d.accepted.length === 0) continue;
    const iss = a.event.claims.iss;
    senders.set(bucketKey("sender", iss, ""), iss);
    for (const cid of d.accepted) {
      const stored = read.clients.get(cid)!.buckets;
      const all = stored[ALL_SENDERS];
      const own = stored[iss];
      if (all) before.set(bucketKey("client", iss, cid), { tokens: all[0], updatedAt: all[1] });
      if (own) before.set(bucketKey("sender_client", iss, cid), { tokens: own[0], updatedAt: own[1] });
    }
  }
  if (senders.size === 0) return { kind: "charges", charges: noCharges() };
  const senderKeys = [...senders.keys()].sort();
  const locked = options.lockedSenders !== undefined;
  if (options.lockedSenders) for (const [key, bucket] of options.lockedSenders) before.set(key, bucket);

  /** The pure decisions over `before`; `senderHit`: some event met a sender's bucket short. */
  const charge = () => {
    const state = new Map(before);
    const delays = new Map<AcceptedInput, number>();
    const outcome = new Map(decisions);
    const perSender = new Map<string, { charged: number; needed: number }>();
    let senderHit = false;
    for (const [a, d] of decisions) {
      const iss = a.event.claims.iss;
      const result = chargeEvent(limits, state, iss, d.accepted, now);
      if (result.kind === "delay") {
        senderHit = true;
        // Until it has waited maxDelaySeconds, an event keeps coming back (at least that often,
        // so a limit raised meanwhile, even from rate 0, still lets it through).
        const waited = a.publishedAt === undefined ? 0 : now - a.publishedAt;
        if (waited < limits.maxDelaySeconds) {
          delays.set(a, Math.min(result.waitSeconds, limits.maxDelaySeconds - waited));
          continue;
        }
        // Waited as long as allowed: every candidate is refused, and the event is stored as refused.
        outcome.set(a, limitedDecision(d, new Set(d.accepted)));
        continue;
      }
      if (result.limited.size > 0) outcome.set(a, limitedDecision(d, result.limited));
      const sum = perSender.get(iss) ?? { charged: 0, needed: 0 };
      sum.needed += d.accepted.length;
      sum.charged += d.accepted.length - result.limited.size;
      perSender.set(iss, sum);
    }
    return { state, delays, outcome, perSender, senderHit };
  };

  const result = charge();
  if (!locked) {
    // A bucket short of the batch's candidates would fail the last statement's condition anyway.
    const short = [...result.perSender].some(([iss, sum]) => {
      const key = bucketKey("sender", iss, "");
      const limit = limitFor(limits, "sender", iss, "");
      return refill(before.get(key) ?? fullBucket(limit, now), limit, now).tokens < sum.needed;
    });
    // Close to a sender's limit: decide on the bucket as it is, and hold it until commit.
    if (options.lockFirst || result.senderHit || short) return { kind: "lock senders", keys: senderKeys };
  }
  for (const [a, d] of result.outcome) decisions.set(a, d);

  const changed = locked ? senderKeys.filter((k) => result.state.get(k) !== before.get(k)) : [];
  const senderBuckets = new Map(changed.map((k) => [k, result.state.get(k)!]));
  const senderCharges = locked ? [] : senderKeys.flatMap((key): SenderCharge[] => {
    const iss = senders.get(key)!;
    const sum = result.perSender.get(iss);
    return sum ? [{ key, limit: limitFor(limits, "sender", iss, ""), ...sum }] : [];
  });
  return {
    kind: "charges",
    charges: { delays: result.delays, senderCharges, senderBuckets, clientBuckets: chargedClients(result.state, before, read.clients, limits, now) },
  };
}

/**
 * The new buckets of every client with a bucket charged, in their stored form.
 * A bucket full again by now is dropped (absent means full): a client keeps
 * entries only for the senders that used part of its budget lately.
 */
function chargedClients(state: BucketState, before: BucketState, clients: ReadonlyMap<string, LockedClient>, limits: RateLimits, now: number): Map<string, StoredBuckets> {
  const charged = new Map<string, StoredBuckets>();
  state.forEach((bucket, key) => {
    if (bucket === before.get(key)) return;
    const scope = bucketScope(key);
    if (scope.scope === "sender") return;
    let next = charged.get(scope.client);
    if (next === undefined) charged.set(scope.client, (next = { ...clients.get(scope.client)!.buckets }));
    next[scope.scope === "client" ? ALL_SENDERS : scope.sender] = [bucket.tokens, bucket.updatedAt];
  });
  charged.forEach((buckets, cid) => {
    for (const sender in buckets) {
      const [tokens, updatedAt] = buckets[sender]!;
      const limit = sender === ALL_SENDERS ? limitFor(limits, "client", "", cid) : limitFor(limits, "sender_client", sender, cid);
      if (refilledTokens(tokens, updatedAt, limit, now) >= limit.burst) delete buckets[sender];
    }
  });
  return charged;
}

/** An event's refusals as its record keeps them: [cid, reason] pairs, in the event's recipient order. */
function refusalRecord(a: AcceptedInput, d: RecipientDecision): string {
  const reasons = new Map(d.refused.map((r) => [r.cid, r.reason]));
  return JSON.stringify(a.event.claims.rcpt.flatMap((r) => {
    const reason = reasons.get(r.cid);
    return reason === undefined ? [] : [[r.cid, reason]];
  }));
}

function limitedDecision(d: RecipientDecision, limited: ReadonlySet<string>): RecipientDecision {
  const reason: RecipientReason = "rate_limited";
  return {
    accepted: d.accepted.filter((c) => !limited.has(c)),
    refused: [...d.refused, ...d.accepted.filter((c) => limited.has(c)).map((cid) => ({ cid, reason }))],
  };
}
