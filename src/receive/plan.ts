/**
 * A batch's decisions as a function of what its transaction read: which
 * recipient of which new event is accepted or refused (policy/recipients.ts),
 * what each rate-limit bucket is charged (policy/rate-limit.ts), which events
 * wait for their sender's bucket, and from that the rows to write: deliveries
 * in their order per client, refusals, the clients' cursor bumps and bucket
 * charges, and the senders' charges. Pure: no I/O, no clock (`now` comes in);
 * test/unit/plan.test.ts drives it directly.
 *
 * What it reads was read without a lock, so its decisions are made on condition
 * (src/receive/commit.ts): the last statement charges each bucket only if it
 * still holds what the batch needed. Where a bucket is already short as read,
 * the planner asks for the buckets locked and read again instead.
 */
import type { RecipientReason } from "../errors.ts";
import {
  bucketKey, chargeEvent, fullBucket, limitFor, refill, refilledTokens, type Bucket, type BucketState, type Limit, type RateLimits,
} from "../policy/rate-limit.ts";
import { decideRecipients, type CapabilityBinding, type RecipientDecision, type RecipientFacts } from "../policy/recipients.ts";
import type { AcceptedInput, EventOutcome } from "./types.ts";

/** A client's rate buckets as its row keeps them: `"*"` for all senders together, else by sender. */
export type StoredBuckets = Record<string, [tokens: number, updatedAt: number]>;
export const ALL_SENDERS = "*";

export interface ReadClient {
  readonly id: string;
  readonly buckets: StoredBuckets;
  /**
   * When it was registered, as Postgres wrote it: the last statement writes to this
   * registration only, not to a client removed and registered again under the id since.
   */
  readonly createdAt: string;
}

/**
 * A client's bucket charges, one per slot as StoredBuckets names them: [slot,
 * rate, burst, tokens charged, tokens the bucket must still hold]. A slot charged
 * nothing is dropped where full again (charge_client_buckets, migrations/012).
 */
export type ClientCharges = [slot: string, rate: number, burst: number, charged: number, needed: number][];

/** What the transaction read for the decisions (statement 2). */
export interface DecisionInputs {
  /** The addressed clients that exist, by id, read without a lock. */
  readonly clients: ReadonlyMap<string, ReadClient>;
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
  /**
   * `ordinal`: the delivery's place among the batch's deliveries to its client (1, 2, …);
   * statement 3 adds it to the client's cursor as it is at commit.
   */
  readonly deliveries: { client: string[]; ordinal: number[]; iss: string[]; jti: string[] };
  readonly refusals: { client: string[]; reason: string[]; iss: string[]; jti: string[] };
  /**
   * New events none of whose recipients is accepted: kept as a record, not with their body
   * (migrations/011), their refusals as JSON [cid, reason] pairs in recipient order, not as rows.
   */
  readonly records: { iss: string[]; jti: string[]; refused: string[] };
  /** Client rows to update: how many deliveries to add to the cursor, the registration read, and with rate limits the charges. */
  readonly clients: [string, [deliveries: number, createdAt: string] | [deliveries: number, createdAt: string, ClientCharges]][];
  /** The clients are locked already (the planner asked): the last statement need not lock them first. */
  readonly clientsLocked: boolean;
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
   * The buckets must be read again under a lock, the clients' (`clients`, sorted)
   * first, then the senders' (`senders`, sorted), and the batch planned on them:
   * an event met one short, or the last statement could not charge it (the
   * caller asked to lock first).
   */
  | { readonly kind: "lock"; readonly clients: readonly string[]; readonly senders: readonly string[] };

/** The buckets as read again under a lock: clients that are gone since the first read are missing. */
export interface LockedBuckets {
  readonly clients: ReadonlyMap<string, StoredBuckets>;
  readonly senders: BucketState;
}

export interface PlanOptions {
  readonly lockFirst: boolean;
  readonly locked?: LockedBuckets;
}

/**
 * Plans a batch. With `locked` (the buckets as read under a lock), charges
 * those exactly; without, charges the buckets as read and leaves each charge to
 * the last statement's condition, unless `lockFirst` or a bucket short of the
 * batch asks for the lock first.
 */
export function planBatch(inputs: PlanInputs, options: PlanOptions): PlanResult {
  const { accepted, stored, read, limits, now } = inputs;
  const facts: RecipientFacts = { knownClients: new Set(read.clients.keys()), capabilities: read.capabilities, blocks: read.blocks };
  const decisions = new Map<AcceptedInput, RecipientDecision>();
  for (const a of stored) decisions.set(a, decideRecipients(a.event.claims, facts));
  let charged = noCharges();
  if (limits) {
    const charges = chargeRateLimits(decisions, limits, now, read, options);
    if (charges.kind === "lock") return charges;
    charged = charges.charges;
  }

  /** Deliveries to each client so far in the batch. */
  const deliveredTo = new Map<string, number>();
  const deliveries: Plan["deliveries"] = { client: [], ordinal: [], iss: [], jti: [] };
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
      const ordinal = (deliveredTo.get(cid) ?? 0) + 1;
      deliveredTo.set(cid, ordinal);
      deliveries.client.push(cid); deliveries.ordinal.push(ordinal); deliveries.iss.push(iss); deliveries.jti.push(jti);
    }
    for (const r of decision.refused) {
      refusals.client.push(r.cid); refusals.reason.push(r.reason); refusals.iss.push(iss); refusals.jti.push(jti);
    }
  }
  const clients: Plan["clients"] = [];
  for (const c of read.clients.values()) {
    const n = deliveredTo.get(c.id) ?? 0;
    const charges = charged.clientCharges.get(c.id);
    if (n > 0 || charges !== undefined) clients.push([c.id, charges === undefined ? [n, c.createdAt] : [n, c.createdAt, charges]]);
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
      outcomes, deliveries, refusals, records, clients, clientsLocked: options.locked !== undefined, takenBack: [...charged.delays.keys()], reported,
      senderCharges: charged.senderCharges, senderBuckets: charged.senderBuckets,
    },
  };
}

interface Charges {
  /** Events over their sender's limit, to redeliver after this many seconds. */
  readonly delays: Map<AcceptedInput, number>;
  readonly senderCharges: SenderCharge[];
  readonly senderBuckets: Map<string, Bucket>;
  /** The charges of the clients charged (and of their buckets full again, to drop). */
  readonly clientCharges: Map<string, ClientCharges>;
}

const noCharges = (): Charges => ({ delays: new Map(), senderCharges: [], senderBuckets: new Map(), clientCharges: new Map() });

/** Tokens a bucket slot was charged by the batch, and its candidates (what it had to hold). */
interface Tally { charged: number; needed: number }

/**
 * Charges the buckets of every candidate delivery, in batch order, and moves
 * rate-limited recipients into the refusals (`decisions` is updated). Yields
 * the events to delay (over their sender's limit and not yet waiting longer
 * than allowed), with how long; the senders' charges, left to the last
 * statement unless their buckets were locked (then their new state); and the
 * clients' charges. Unlocked, any bucket short of what the batch asks of it
 * (a delay, a rate-limited recipient) asks for the lock instead: a decision
 * that refuses cannot be made on condition.
 */
function chargeRateLimits(
  decisions: Map<AcceptedInput, RecipientDecision>,
  limits: RateLimits,
  now: number,
  read: DecisionInputs,
  options: PlanOptions,
): { kind: "charges"; charges: Charges } | { kind: "lock"; clients: readonly string[]; senders: readonly string[] } {
  const locked = options.locked;
  const bucketsOf = (cid: string): StoredBuckets => locked?.clients.get(cid) ?? read.clients.get(cid)!.buckets;
  const before: BucketState = new Map(read.senders);
  const senders = new Map<string, string>();
  const candidates = new Set<string>();
  for (const [a, d] of decisions) {
    if (d.accepted.length === 0) continue;
    const iss = a.event.claims.iss;
    senders.set(bucketKey("sender", iss, ""), iss);
    for (const cid of d.accepted) {
      candidates.add(cid);
      const stored = bucketsOf(cid);
      const all = stored[ALL_SENDERS];
      const own = stored[iss];
      if (all) before.set(bucketKey("client", iss, cid), { tokens: all[0], updatedAt: all[1] });
      if (own) before.set(bucketKey("sender_client", iss, cid), { tokens: own[0], updatedAt: own[1] });
    }
  }
  if (senders.size === 0) return { kind: "charges", charges: noCharges() };
  const senderKeys = [...senders.keys()].sort();
  if (locked) for (const [key, bucket] of locked.senders) before.set(key, bucket);

  /** The pure decisions over `before`; `hit`: some event met a bucket short. */
  const charge = () => {
    const state = new Map(before);
    const delays = new Map<AcceptedInput, number>();
    const outcome = new Map(decisions);
    const perSender = new Map<string, Tally>();
    /** By client, then slot (ALL_SENDERS or the sender). */
    const perClient = new Map<string, Map<string, Tally>>();
    let hit = false;
    for (const [a, d] of decisions) {
      const iss = a.event.claims.iss;
      const result = chargeEvent(limits, state, iss, d.accepted, now);
      if (result.kind === "delay") {
        hit = true;
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
      if (result.limited.size > 0) {
        hit = true;
        outcome.set(a, limitedDecision(d, result.limited));
      }
      const sum = perSender.get(iss) ?? { charged: 0, needed: 0 };
      sum.needed += d.accepted.length;
      sum.charged += d.accepted.length - result.limited.size;
      perSender.set(iss, sum);
      for (const cid of d.accepted) {
        const cost = result.limited.has(cid) ? 0 : 1;
        let slots = perClient.get(cid);
        if (slots === undefined) perClient.set(cid, (slots = new Map()));
        addToTally(slots, ALL_SENDERS, cost);
        addToTally(slots, iss, cost);
      }
    }
    return { state, delays, outcome, perSender, perClient, hit };
  };

  const result = charge();
  if (!locked) {
    // A sender's bucket short of the batch's candidates would fail the last statement's condition anyway.
    const short = [...result.perSender].some(([iss, sum]) => {
      const key = bucketKey("sender", iss, "");
      const limit = limitFor(limits, "sender", iss, "");
      return refill(before.get(key) ?? fullBucket(limit, now), limit, now).tokens < sum.needed;
    });
    if (options.lockFirst || result.hit || short) return { kind: "lock", clients: [...candidates].sort(), senders: senderKeys };
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
    charges: { delays: result.delays, senderCharges, senderBuckets, clientCharges: clientCharges(result.perClient, bucketsOf, limits, now, locked !== undefined) },
  };
}

function addToTally(slots: Map<string, Tally>, slot: string, cost: number): void {
  const tally = slots.get(slot);
  if (tally === undefined) slots.set(slot, { charged: cost, needed: 1 });
  else { tally.charged += cost; tally.needed += 1; }
}

/**
 * Each charged client's charges, by slot: what its deliveries took, and (read
 * without a lock) what the slot had to hold for the decisions to stand; locked,
 * the decisions are exact and need no condition. Slots of other senders full
 * again by now are charged nothing, to be dropped (absent means full): a client
 * keeps entries only for the senders that used part of its budget lately.
 */
function clientCharges(
  perClient: ReadonlyMap<string, ReadonlyMap<string, Tally>>, bucketsOf: (cid: string) => StoredBuckets, limits: RateLimits, now: number, locked: boolean,
): Map<string, ClientCharges> {
  const limitOf = (slot: string, cid: string): Limit =>
    slot === ALL_SENDERS ? limitFor(limits, "client", "", cid) : limitFor(limits, "sender_client", slot, cid);
  const out = new Map<string, ClientCharges>();
  perClient.forEach((slots, cid) => {
    const charges: ClientCharges = [];
    slots.forEach((tally, slot) => {
      const limit = limitOf(slot, cid);
      charges.push([slot, limit.rate, limit.burst, tally.charged, locked ? 0 : tally.needed]);
    });
    const stored = bucketsOf(cid);
    for (const slot in stored) {
      if (slots.has(slot)) continue;
      const limit = limitOf(slot, cid);
      const [tokens, updatedAt] = stored[slot]!;
      if (refilledTokens(tokens, updatedAt, limit, now) >= limit.burst) charges.push([slot, limit.rate, limit.burst, 0, 0]);
    }
    out.set(cid, charges);
  });
  return out;
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
