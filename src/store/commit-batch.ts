/**
 * The one write of the receive path: a batch of verified events, their
 * deliveries, refusals and rate-limit charges, in a single transaction.
 * Acknowledgements to JetStream are released only after it commits.
 *
 * Locks are taken in one global order, so concurrent batches queue rather than
 * deadlock: event keys (sorted), then client rows (sorted), then client-scoped
 * rate buckets (sorted), and the senders' buckets last. Expected races, and why
 * they are fine:
 * - an event already stored (redelivery, a second worker, a retried publish):
 *   ON CONFLICT (iss, jti) DO NOTHING, and it is reported as a duplicate;
 * - two batches delivering to the same clients: the client row lock orders
 *   their cursors by commit;
 * - two batches charging the same bucket: the row lock makes the charge exact.
 *
 * A sender's bucket is one row every batch from that sender charges, so every
 * worker would queue on it for the rest of the transaction. It is read without
 * a lock and charged by the transaction's last statement instead, on the
 * condition that it still holds enough tokens for every candidate of the batch:
 * then no event would have been delayed by the bucket as it is at commit, and
 * every decision stands. If it does not (a sender close to its limit, charged
 * concurrently), the transaction is rolled back and the batch runs again with
 * the sender's bucket locked before anything is decided.
 */
import { sql, type Transaction } from "kysely";
import type { EventReason, RecipientReason } from "../errors.ts";
import { chargeEvent, bucketKey, bucketScope, fullBucket, limitFor, refill, type BucketState, type Limit, type RateLimits } from "../policy/rate-limit.ts";
import { decideRecipients, type RecipientDecision } from "../policy/recipients.ts";
import type { VerifiedEvent } from "../protocol/verify.ts";
import { loadRecipientFacts } from "./capabilities.ts";
import { numberArray, textArray } from "./arrays.ts";
import type { Db } from "./db.ts";
import type { Database } from "./schema.ts";

export interface AcceptedInput {
  readonly streamSeq: number;
  readonly event: VerifiedEvent;
  /** When JetStream stored the message (seconds): how long a rate-limited event has waited. */
  readonly publishedAt?: number;
}

export interface RefusedInput {
  readonly streamSeq: number;
  readonly subject: string;
  readonly reason: EventReason;
  readonly detail: string;
  readonly claimed?: { readonly iss: string; readonly jti: string } | undefined;
  readonly sample: string;
}

export type EventOutcome =
  | { readonly streamSeq: number; readonly status: "stored"; readonly decision: RecipientDecision }
  | { readonly streamSeq: number; readonly status: "duplicate" }
  /** Over the sender's limit: not stored; redeliver after `waitSeconds`. */
  | { readonly streamSeq: number; readonly status: "delayed"; readonly waitSeconds: number };

export interface CommitOptions {
  /** Seconds since the epoch, from the relay's (injectable) clock. */
  readonly now: number;
  /** Off: no bucket is read or charged. */
  readonly rateLimits?: RateLimits | undefined;
  /** Told when the batch runs a second time after a race on a sender's bucket. */
  readonly onSenderRace?: () => void;
}

/** NOTIFY payloads are capped at 8000 bytes; past that, wake every waiter. */
const MAX_NOTIFY_PAYLOAD = 7900;

const eventKey = (a: AcceptedInput): string => `${a.event.claims.iss}\u0000${a.event.claims.jti}`;

/** The sender's bucket changed between reading and charging it: run the batch again, locking it first. */
class SenderBucketRace extends Error {}

export async function commitBatch(
  db: Db,
  accepted: readonly AcceptedInput[],
  refused: readonly RefusedInput[],
  options: CommitOptions,
): Promise<EventOutcome[]> {
  const known = storedKeys.get(db) ?? new Set<string>();
  storedKeys.set(db, known);
  const attempt = (lockSenders: boolean): Promise<EventOutcome[]> => db.kysely.transaction().execute(async (trx) => {
    const { outcomes, senderCharges } = await storeEvents(trx, accepted, options, known, lockSenders);
    if (refused.length > 0) await recordRefusedEvents(trx, refused);
    const woken = new Set<string>();
    for (const o of outcomes) if (o.status === "stored") for (const cid of o.decision.accepted) woken.add(cid);
    const notify = woken.size === 0 ? undefined : [...woken].join("\n");
    await chargeSendersAndNotify(trx, senderCharges, options.now, db.schema, notify === undefined || notify.length <= MAX_NOTIFY_PAYLOAD ? notify : "*");
    return outcomes;
  });
  let outcomes: EventOutcome[];
  try {
    outcomes = await attempt(false);
  } catch (err) {
    if (!(err instanceof SenderBucketRace)) throw err;
    options.onSenderRace?.();
    outcomes = await attempt(true);
  }
  // Only once committed is a key known to be stored (a rolled-back insert must be retried).
  for (const a of accepted) known.add(a.event.key.thumbprint);
  return outcomes;
}

/** A sender bucket's charge, made by the transaction's last statement. */
interface SenderCharge {
  readonly key: string;
  readonly limit: Limit;
  /** Tokens the batch's stored deliveries take. */
  readonly charged: number;
  /** Tokens the bucket must hold for the batch's decisions to stand: all its events' candidates. */
  readonly needed: number;
}

/**
 * The last statement: charges the senders' buckets (the refill mirrors refill()
 * in policy/rate-limit.ts) where they still hold what the batch needs, and wakes
 * the long-polls of the clients that got deliveries (NOTIFY is sent on commit).
 */
async function chargeSendersAndNotify(
  trx: Transaction<Database>,
  charges: readonly SenderCharge[],
  now: number,
  channel: string,
  notify: string | undefined,
): Promise<void> {
  if (charges.length === 0) {
    if (notify !== undefined) await sql`SELECT pg_notify(${channel}, ${notify})`.execute(trx);
    return;
  }
  const { rows } = await sql<{ charged: number }>`
    WITH charged AS (
      UPDATE rate_buckets AS b
      SET tokens = least(v.burst, b.tokens + greatest(0, ${now}::float8 - b.updated_at) * v.rate) - v.charged,
          updated_at = greatest(${now}::float8, b.updated_at)
      FROM unnest(${textArray(charges.map((c) => c.key))}::text[], ${numberArray(charges.map((c) => c.limit.rate))}::float8[], ${numberArray(charges.map((c) => c.limit.burst))}::float8[],
                  ${numberArray(charges.map((c) => c.charged))}::float8[], ${numberArray(charges.map((c) => c.needed))}::float8[]) AS v(key, rate, burst, charged, needed)
      WHERE b.key = v.key AND least(v.burst, b.tokens + greatest(0, ${now}::float8 - b.updated_at) * v.rate) >= v.needed
      RETURNING 1
    )
    SELECT (SELECT count(*)::int FROM charged) AS charged${notify === undefined ? sql`` : sql`, pg_notify(${channel}, ${notify})`}`.execute(trx);
  if (rows[0]!.charged !== charges.length) throw new SenderBucketRace();
}

/** Thumbprints of verifying keys already in peer_keys, per database: saves a statement per batch. */
const storedKeys = new WeakMap<Db, Set<string>>();

async function storeEvents(
  trx: Transaction<Database>,
  accepted: readonly AcceptedInput[],
  options: CommitOptions,
  knownKeys: ReadonlySet<string>,
  lockSenders: boolean,
): Promise<{ outcomes: EventOutcome[]; senderCharges: SenderCharge[] }> {
  // The same event twice in one batch (a redelivery racing its original) is stored once.
  const firstOf = new Map<string, AcceptedInput>();
  for (const a of accepted) if (!firstOf.has(eventKey(a))) firstOf.set(eventKey(a), a);
  const unique = [...firstOf.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, a]) => a);
  if (unique.length === 0) return { outcomes: [], senderCharges: [] };

  const stored = await insertNewEvents(trx, unique, knownKeys);

  // Lock every addressed client that exists, in id order: the lock both proves
  // the client exists at commit time and orders its cursors.
  const candidates = [...new Set(stored.flatMap((a) => a.event.claims.rcpt.map((r) => r.cid)))].sort();
  const locked = candidates.length === 0 ? [] : (
    await sql<{ id: string; delivery_seq: string; buckets: StoredBuckets }>`
      SELECT id, delivery_seq, buckets FROM clients WHERE id = ANY(${textArray(candidates)}::text[]) ORDER BY id FOR UPDATE`.execute(trx)
  ).rows;
  const nextSeq = new Map(locked.map((r) => [r.id, Number(r.delivery_seq)]));
  const presented = [...new Set(stored.flatMap((a) => a.event.claims.rcpt.flatMap((r) => (r.cap === undefined ? [] : [r.cap]))))];
  const facts = await loadRecipientFacts(trx, new Set(nextSeq.keys()), presented);

  const decisions = new Map<AcceptedInput, RecipientDecision>();
  for (const a of stored) decisions.set(a, decideRecipients(a.event.claims, facts));
  const { delays, senderCharges, clientBuckets } = options.rateLimits?.enabled
    ? await chargeRateLimits(trx, decisions, options.rateLimits, options.now, lockSenders, new Map(locked.map((r) => [r.id, r.buckets])))
    : { delays: new Map<AcceptedInput, number>(), senderCharges: [], clientBuckets: new Map<string, StoredBuckets>() };
  if (delays.size > 0) {
    // Delayed events were inserted above only to learn they are new: take them back, so
    // their redelivery is not mistaken for a duplicate.
    const back = [...delays.keys()];
    await sql`DELETE FROM events WHERE (iss, jti) IN (SELECT * FROM unnest(
      ${textArray(back.map((a) => a.event.claims.iss))}::text[], ${textArray(back.map((a) => a.event.claims.jti))}::text[]))`.execute(trx);
  }

  const delivery = { client: [] as string[], seq: [] as number[], iss: [] as string[], jti: [] as string[] };
  const refusal = { client: [] as string[], reason: [] as string[], iss: [] as string[], jti: [] as string[] };
  for (const [a, decision] of decisions) {
    if (delays.has(a)) continue;
    const { iss, jti } = a.event.claims;
    for (const cid of decision.accepted) {
      const seq = nextSeq.get(cid)! + 1;
      nextSeq.set(cid, seq);
      delivery.client.push(cid); delivery.seq.push(seq); delivery.iss.push(iss); delivery.jti.push(jti);
    }
    for (const r of decision.refused) {
      refusal.client.push(r.cid); refusal.reason.push(r.reason); refusal.iss.push(iss); refusal.jti.push(jti);
    }
  }
  if (delivery.client.length > 0) {
    await sql`
      INSERT INTO deliveries (client_id, seq, iss, jti)
      SELECT * FROM unnest(${textArray(delivery.client)}::text[], ${numberArray(delivery.seq)}::bigint[], ${textArray(delivery.iss)}::text[], ${textArray(delivery.jti)}::text[])`.execute(trx);
  }
  // One write per client row: its cursor and, when charged, its buckets. Sent as one
  // JSON object, {id: [cursor, buckets?]}, as the buckets are JSON already.
  const rowUpdates: [string, [number] | [number, StoredBuckets]][] = [];
  for (const r of locked) {
    const seq = nextSeq.get(r.id)!;
    const buckets = clientBuckets.get(r.id);
    if (seq !== Number(r.delivery_seq) || buckets !== undefined) rowUpdates.push([r.id, buckets === undefined ? [seq] : [seq, buckets]]);
  }
  if (rowUpdates.length > 0) {
    await sql`
      UPDATE clients SET delivery_seq = (v.value->>0)::bigint, buckets = coalesce(v.value->1, clients.buckets)
      FROM jsonb_each(${JSON.stringify(Object.fromEntries(rowUpdates))}::jsonb) AS v
      WHERE clients.id = v.key`.execute(trx);
  }
  if (refusal.client.length > 0) {
    await sql`
      INSERT INTO recipient_refusals (client_id, reason, iss, jti)
      SELECT * FROM unnest(${textArray(refusal.client)}::text[], ${textArray(refusal.reason)}::text[], ${textArray(refusal.iss)}::text[], ${textArray(refusal.jti)}::text[])`.execute(trx);
  }

  const outcomes = accepted.map((a): EventOutcome => {
    const decision = decisions.get(a);
    const wait = delays.get(a);
    if (wait !== undefined) return { streamSeq: a.streamSeq, status: "delayed", waitSeconds: wait };
    return decision ? { streamSeq: a.streamSeq, status: "stored", decision } : { streamSeq: a.streamSeq, status: "duplicate" };
  });
  return { outcomes, senderCharges };
}

/** Inserts the batch's events (already sorted) and returns those that were new. */
async function insertNewEvents(trx: Transaction<Database>, unique: readonly AcceptedInput[], knownKeys: ReadonlySet<string>): Promise<AcceptedInput[]> {
  const keys = new Map(unique.filter((a) => !knownKeys.has(a.event.key.thumbprint)).map((a) => [a.event.key.thumbprint, a.event.key]));
  if (keys.size > 0) await trx
    .insertInto("peer_keys")
    .values([...keys.values()].map((k) => ({ thumbprint: k.thumbprint, kid: k.kid, homeserver: k.homeserver, jwk: JSON.stringify(k.jwk) })))
    .onConflict((oc) => oc.column("thumbprint").doNothing())
    .execute();
  const inserted = await sql<{ iss: string; jti: string }>`
    INSERT INTO events (iss, jti, grp, issued_at, expires_at, token, key_thumbprint, stream_seq)
    SELECT iss, jti, grp, to_timestamp(iat), to_timestamp(exp), token, key_thumbprint, stream_seq FROM unnest(
      ${textArray(unique.map((a) => a.event.claims.iss))}::text[],
      ${textArray(unique.map((a) => a.event.claims.jti))}::text[],
      ${textArray(unique.map((a) => a.event.claims.grp))}::text[],
      ${numberArray(unique.map((a) => a.event.claims.iat))}::float8[],
      ${numberArray(unique.map((a) => a.event.claims.exp))}::float8[],
      -- A verified token is three base64url parts joined by dots: no comma, and
      -- string_to_array is cheaper for Postgres than parsing a quoted literal.
      string_to_array(${unique.map((a) => a.event.token).join(",")}::text, ','),
      ${textArray(unique.map((a) => a.event.key.thumbprint))}::text[],
      ${numberArray(unique.map((a) => a.streamSeq))}::bigint[]
    ) AS v(iss, jti, grp, iat, exp, token, key_thumbprint, stream_seq)
    ON CONFLICT (iss, jti) DO NOTHING
    RETURNING iss, jti`.execute(trx);
  const isNew = new Set(inserted.rows.map((r) => `${r.iss}\u0000${r.jti}`));
  return unique.filter((a) => isNew.has(eventKey(a)));
}

/** A client's rate buckets as its row keeps them: `"*"` for all senders together, else by sender. */
type StoredBuckets = Record<string, [tokens: number, updatedAt: number]>;
const ALL_SENDERS = "*";

/**
 * Charges the buckets of every candidate delivery, in batch order, and moves
 * rate-limited recipients into the refusals. Returns the events to delay (over
 * their sender's limit and not yet waiting longer than allowed), with how long;
 * the senders' charges, left to the transaction's last statement unless their
 * buckets were locked here (`lockSenders`, or an event met one short); and the
 * new buckets of the clients charged, for their row's update. Client rows are
 * locked already, so their buckets are exact.
 */
async function chargeRateLimits(
  trx: Transaction<Database>,
  decisions: Map<AcceptedInput, RecipientDecision>,
  limits: RateLimits,
  now: number,
  lockSenders: boolean,
  clientRows: ReadonlyMap<string, StoredBuckets>,
): Promise<{ delays: Map<AcceptedInput, number>; senderCharges: SenderCharge[]; clientBuckets: Map<string, StoredBuckets> }> {
  const before: BucketState = new Map();
  const senders = new Map<string, string>();
  for (const [a, d] of decisions) {
    if (d.accepted.length === 0) continue;
    const iss = a.event.claims.iss;
    senders.set(bucketKey("sender", iss, ""), iss);
    for (const cid of d.accepted) {
      const stored = clientRows.get(cid)!;
      const all = stored[ALL_SENDERS];
      const own = stored[iss];
      if (all) before.set(bucketKey("client", iss, cid), { tokens: all[0], updatedAt: all[1] });
      if (own) before.set(bucketKey("sender_client", iss, cid), { tokens: own[0], updatedAt: own[1] });
    }
  }
  if (senders.size === 0) return { delays: new Map(), senderCharges: [], clientBuckets: new Map() };
  const senderKeys = [...senders.keys()].sort();
  // Missing sender buckets are created full; all are read, not locked (see the top of this file).
  // The SELECT's snapshot predates the INSERT, so each key comes from one side or, if another
  // batch is creating it right now, from neither (and counts as full until the last statement).
  const rows = await sql<{ key: string; tokens: number; updated_at: number }>`
    WITH created AS (
      INSERT INTO rate_buckets (key, tokens, updated_at)
      SELECT * FROM unnest(${textArray(senderKeys)}::text[], ${numberArray(senderKeys.map((k) => limitFor(limits, "sender", senders.get(k)!, "").burst))}::float8[],
                           ${numberArray(senderKeys.map(() => now))}::float8[])
      ON CONFLICT (key) DO NOTHING
      RETURNING key, tokens, updated_at
    )
    SELECT * FROM created UNION ALL SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray(senderKeys)}::text[])`.execute(trx);
  for (const r of rows.rows) before.set(r.key, { tokens: r.tokens, updatedAt: r.updated_at });

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

  let result = charge();
  // A bucket short of the batch's candidates would fail the last statement's condition anyway.
  const short = [...result.perSender].some(([iss, sum]) => {
    const key = bucketKey("sender", iss, "");
    const limit = limitFor(limits, "sender", iss, "");
    return refill(before.get(key) ?? fullBucket(limit, now), limit, now).tokens < sum.needed;
  });
  const locked = lockSenders || result.senderHit || short;
  if (locked) {
    // Close to a sender's limit: decide on the bucket as it is, and hold it until commit.
    const fresh = await sql<{ key: string; tokens: number; updated_at: number }>`
      SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray(senderKeys)}::text[]) ORDER BY key FOR UPDATE`.execute(trx);
    for (const r of fresh.rows) before.set(r.key, { tokens: r.tokens, updatedAt: r.updated_at });
    result = charge();
  }
  for (const [a, d] of result.outcome) decisions.set(a, d);

  if (locked) {
    const changed = senderKeys.filter((k) => result.state.get(k) !== before.get(k));
    if (changed.length > 0) {
      await sql`
        UPDATE rate_buckets SET tokens = v.tokens, updated_at = v.updated_at
        FROM unnest(${textArray(changed)}::text[], ${numberArray(changed.map((k) => result.state.get(k)!.tokens))}::float8[],
                    ${numberArray(changed.map((k) => result.state.get(k)!.updatedAt))}::float8[]) AS v(key, tokens, updated_at)
        WHERE rate_buckets.key = v.key`.execute(trx);
    }
  }
  const senderCharges = locked ? [] : senderKeys.flatMap((key): SenderCharge[] => {
    const iss = senders.get(key)!;
    const sum = result.perSender.get(iss);
    return sum ? [{ key, limit: limitFor(limits, "sender", iss, ""), ...sum }] : [];
  });
  return { delays: result.delays, senderCharges, clientBuckets: chargedClients(result.state, before, clientRows, limits, now) };
}

/**
 * The new buckets of every client with a bucket charged, in their stored form.
 * A bucket full again by now is dropped (absent means full): a client keeps
 * entries only for the senders that used part of its budget lately.
 */
function chargedClients(state: BucketState, before: BucketState, clientRows: ReadonlyMap<string, StoredBuckets>, limits: RateLimits, now: number): Map<string, StoredBuckets> {
  const charged = new Map<string, StoredBuckets>();
  for (const [key, bucket] of state) {
    const scope = bucketScope(key);
    if (bucket === before.get(key) || scope.scope === "sender") continue;
    const next = charged.get(scope.client) ?? { ...clientRows.get(scope.client)! };
    next[scope.scope === "client" ? ALL_SENDERS : scope.sender] = [bucket.tokens, bucket.updatedAt];
    charged.set(scope.client, next);
  }
  for (const [cid, buckets] of charged) {
    for (const [sender, [tokens, updatedAt]] of Object.entries(buckets)) {
      const limit = sender === ALL_SENDERS ? limitFor(limits, "client", "", cid) : limitFor(limits, "sender_client", sender, cid);
      if (refill({ tokens, updatedAt }, limit, now).tokens >= limit.burst) delete buckets[sender];
    }
  }
  return charged;
}

function limitedDecision(d: RecipientDecision, limited: ReadonlySet<string>): RecipientDecision {
  const reason: RecipientReason = "rate_limited";
  return {
    accepted: d.accepted.filter((c) => !limited.has(c)),
    refused: [...d.refused, ...d.accepted.filter((c) => limited.has(c)).map((cid) => ({ cid, reason }))],
  };
}

async function recordRefusedEvents(trx: Transaction<Database>, refused: readonly RefusedInput[]): Promise<void> {
  await sql`
    INSERT INTO refused_events (stream_seq, subject, reason, detail, claimed_iss, claimed_jti, sample)
    SELECT * FROM unnest(
      ${refused.map((r) => r.streamSeq)}::bigint[],
      ${refused.map((r) => r.subject)}::text[],
      ${refused.map((r) => r.reason)}::text[],
      ${refused.map((r) => r.detail)}::text[],
      ${refused.map((r) => r.claimed?.iss ?? null)}::text[],
      ${refused.map((r) => r.claimed?.jti ?? null)}::text[],
      ${refused.map((r) => r.sample)}::text[]
    )
    ON CONFLICT (stream_seq) DO NOTHING`.execute(trx);
}
