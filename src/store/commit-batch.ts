/**
 * The one write of the receive path: a batch of verified events, their
 * deliveries, refusals and rate-limit charges, in a single transaction of three
 * statements (every round trip is latency under load, and rows locked for it):
 * 1. insert the events, learning which are new;
 * 2. lock the clients they address and read what the decisions need: those
 *    clients' cursors and buckets, the capabilities presented, blocks, and the
 *    senders' buckets;
 * then the decisions, pure functions of what was read (policy/), and
 * 3. write them: deliveries, cursors and client buckets, refusals, the senders'
 *    charges, and the NOTIFY that wakes long-polls (sent on commit).
 * Acknowledgements to JetStream are released only after it commits.
 *
 * Locks are taken in one global order, so concurrent batches queue rather than
 * deadlock: event keys (sorted), then client rows (sorted), and the senders'
 * buckets last. Expected races, and why they are fine:
 * - an event already stored (redelivery, a second worker, a retried publish):
 *   ON CONFLICT (iss, jti) DO NOTHING, and it is reported as a duplicate;
 * - two batches delivering to the same clients: the client row lock orders
 *   their cursors by commit, and makes the charge of the client's own buckets
 *   (kept in its row) exact;
 * - a revocation committed while the batch waits for a client lock: the batch
 *   decided on what it read first, as if it had committed a moment earlier.
 *
 * A sender's bucket is one row every batch from that sender charges, so every
 * worker would queue on it for the rest of the transaction. It is read without
 * a lock and charged by the last statement instead, on the condition that it
 * still holds enough tokens for every candidate of the batch: then no event
 * would have been delayed by the bucket as it is at commit, and every decision
 * stands. If it does not (a sender close to its limit, charged concurrently),
 * the transaction is rolled back and the batch runs again with the sender's
 * bucket locked before anything is decided.
 */
import { createHash } from "node:crypto";
import type { Writable } from "node:stream";
import { sql, type CompiledQuery, type Kysely, type RawBuilder } from "kysely";
import type { EventReason, RecipientReason } from "../errors.ts";
import { capabilityHashHex } from "../policy/capabilities.ts";
import { chargeEvent, bucketKey, bucketScope, fullBucket, limitFor, refill, refilledTokens, type BucketState, type Limit, type RateLimits } from "../policy/rate-limit.ts";
import { decideRecipients, type CapabilityBinding, type RecipientDecision, type RecipientFacts } from "../policy/recipients.ts";
import type { VerifiedEvent } from "../protocol/verify.ts";
import { numberArray, textArray } from "./arrays.ts";
import type { Db } from "./db.ts";
import type pg from "pg";
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
/** The SQLSTATE sender_bucket_race() raises (migrations/007_commit_pipeline.sql). */
const SENDER_BUCKET_RACE = "FR001";

/**
 * The commit's statements are prepared once per connection, by name: Postgres
 * parsed each of them (long CTEs) on every batch otherwise; and Postgres plans
 * them once (generic plans, db.ts), so a filter on one of a batch's arrays joins
 * against unnest() rather than `= ANY(array)`. Their texts are a handful (only
 * which parts a batch needs varies).
 */
const statementNames = new Map<string, string>();
function statementName(text: string): string {
  let name = statementNames.get(text);
  if (name === undefined) statementNames.set(text, (name = `fedrelay_commit_${createHash("sha256").update(text).digest("hex").slice(0, 16)}`));
  return name;
}

/**
 * The client's socket, to send pipelined statements in one write (pg writes
 * each on its own: a system call, and on a busy machine a wake-up of Postgres,
 * per statement). pg corks it the same way around a statement's messages.
 */
function corkable(client: pg.PoolClient): { cork(): void; uncork(): void } | undefined {
  const stream = (client as unknown as { connection?: { stream?: Partial<Writable> } }).connection?.stream;
  return stream?.cork && stream.uncork ? (stream as Writable) : undefined;
}

/** The commit's statements, sent on its one client in order (kysely only builds them). */
interface Tx {
  readonly kysely: Kysely<Database>;
  rows<R>(query: { compile(kysely: Kysely<Database>): CompiledQuery<R> }): Promise<R[]>;
}

/** Thumbprints of verifying keys already in peer_keys, per database: saves a statement per batch. */
const storedKeys = new WeakMap<Db, Set<string>>();

export async function commitBatch(
  db: Db,
  accepted: readonly AcceptedInput[],
  refused: readonly RefusedInput[],
  options: CommitOptions,
): Promise<EventOutcome[]> {
  const known = storedKeys.get(db) ?? new Set<string>();
  storedKeys.set(db, known);
  const attempt = async (lockSenders: boolean): Promise<EventOutcome[]> => {
    const client = await db.connect();
    const tx: Tx = {
      kysely: db.kysely,
      rows: async (query) => {
        const c = query.compile(db.kysely);
        return (await client.query({ name: statementName(c.sql), text: c.sql, values: c.parameters as unknown[] })).rows;
      },
    };
    // The pool's clients pipeline: BEGIN goes out with statements 1 and 2, and COMMIT right
    // behind statement 3, so a batch costs two round trips, not five (three when it locks a
    // sender's bucket first), and its row locks are released as soon as statement 3 has run.
    // BEGIN's and COMMIT's failures surface from the statements sent with them; they are
    // handled here only so that they are never unhandled.
    let commit: Promise<unknown> | undefined;
    try {
      const socket = corkable(client);
      socket?.cork();
      const begin = client.query("BEGIN");
      begin.catch(() => undefined);
      // decide() sends statements 1 and 2 before its first await: all three leave in one write.
      const deciding = decide(tx, accepted, options, known, lockSenders);
      socket?.uncork();
      const plan = await deciding;
      await begin;
      socket?.cork();
      const written = tx.rows(writeStatement(plan, refused, options.now, db.schema));
      commit = client.query("COMMIT");
      socket?.uncork();
      commit.catch(() => undefined);
      // A race on a sender's bucket fails the statement (sender_bucket_race), and the COMMIT behind it rolls back.
      await written;
      await commit;
      return plan.outcomes;
    } catch (err) {
      if (commit) await commit.catch(() => undefined);
      else await client.query("ROLLBACK").catch(() => undefined);
      throw (err as { code?: string }).code === SENDER_BUCKET_RACE ? new SenderBucketRace() : err;
    } finally {
      client.release();
    }
  };
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

/** A client's rate buckets as its row keeps them: `"*"` for all senders together, else by sender. */
type StoredBuckets = Record<string, [tokens: number, updatedAt: number]>;
const ALL_SENDERS = "*";

interface LockedClient {
  readonly id: string;
  readonly cursor: number;
  readonly buckets: StoredBuckets;
}

/** What statement 3 writes. */
interface Plan {
  readonly outcomes: EventOutcome[];
  readonly deliveries: { client: string[]; seq: number[]; iss: string[]; jti: string[] };
  readonly refusals: { client: string[]; reason: string[]; iss: string[]; jti: string[] };
  /** Client rows to rewrite: new cursor and, when charged, new buckets. */
  readonly clients: [string, [number] | [number, StoredBuckets]][];
  /** Delayed events, inserted only to learn they were new: taken back, so their redelivery is not a duplicate. */
  readonly takenBack: readonly AcceptedInput[];
  /** Charged on condition by the last statement (senders read without a lock)… */
  readonly senderCharges: readonly SenderCharge[];
  /** …or written as decided (senders locked). */
  readonly senderBuckets: ReadonlyMap<string, { tokens: number; updatedAt: number }>;
}

async function decide(
  tx: Tx,
  accepted: readonly AcceptedInput[],
  options: CommitOptions,
  knownKeys: ReadonlySet<string>,
  lockSenders: boolean,
): Promise<Plan> {
  // The same event twice in one batch (a redelivery racing its original) is stored once.
  const firstOf = new Map<string, AcceptedInput>();
  for (const a of accepted) if (!firstOf.has(eventKey(a))) firstOf.set(eventKey(a), a);
  const unique = [...firstOf.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, a]) => a);
  const limits = options.rateLimits?.enabled ? options.rateLimits : undefined;
  // Statements 1 and 2 go out together (one round trip), in this order: events are inserted
  // before any client is locked, as in every batch. So statement 2 cannot wait for the
  // insert to say which events are new, and locks the clients of all of them; a duplicate's
  // (rare: a redelivery) are locked and left as they are.
  const [stored, read] = await Promise.all([
    unique.length === 0 ? [] : insertNewEvents(tx, unique, knownKeys),
    readForDecisions(tx, unique, limits, options.now),
  ]);
  const facts: RecipientFacts = { knownClients: new Set(read.clients.keys()), capabilities: read.capabilities, blocks: read.blocks };
  const decisions = new Map<AcceptedInput, RecipientDecision>();
  for (const a of stored) decisions.set(a, decideRecipients(a.event.claims, facts));
  const charged = limits
    ? await chargeRateLimits(tx, decisions, limits, options.now, lockSenders, read)
    : noCharges();

  const nextSeq = new Map([...read.clients.values()].map((c) => [c.id, c.cursor]));
  const deliveries: Plan["deliveries"] = { client: [], seq: [], iss: [], jti: [] };
  const refusals: Plan["refusals"] = { client: [], reason: [], iss: [], jti: [] };
  for (const [a, decision] of decisions) {
    if (charged.delays.has(a)) continue;
    const { iss, jti } = a.event.claims;
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
  const outcomes = accepted.map((a): EventOutcome => {
    const decision = decisions.get(a);
    const wait = charged.delays.get(a);
    if (wait !== undefined) return { streamSeq: a.streamSeq, status: "delayed", waitSeconds: wait };
    return decision ? { streamSeq: a.streamSeq, status: "stored", decision } : { streamSeq: a.streamSeq, status: "duplicate" };
  });
  return {
    outcomes, deliveries, refusals, clients, takenBack: [...charged.delays.keys()],
    senderCharges: charged.senderCharges, senderBuckets: charged.senderBuckets,
  };
}

/** Statement 1: inserts the batch's events (already sorted) and returns those that were new. */
async function insertNewEvents(tx: Tx, unique: readonly AcceptedInput[], knownKeys: ReadonlySet<string>): Promise<AcceptedInput[]> {
  const keys = new Map(unique.filter((a) => !knownKeys.has(a.event.key.thumbprint)).map((a) => [a.event.key.thumbprint, a.event.key]));
  // Both sent before the first await: the caller pipelines statement 2 right behind.
  const keysStored = keys.size === 0 ? undefined : tx.rows(tx.kysely
    .insertInto("peer_keys")
    .values([...keys.values()].map((k) => ({ thumbprint: k.thumbprint, kid: k.kid, homeserver: k.homeserver, jwk: JSON.stringify(k.jwk) })))
    .onConflict((oc) => oc.column("thumbprint").doNothing()));
  keysStored?.catch(() => undefined);
  const insertedRows = tx.rows(sql<{ iss: string; jti: string }>`
    INSERT INTO events (iss, jti, grp, issued_at, expires_at, token, key_thumbprint, stream_seq)
    SELECT iss, jti, grp, to_timestamp(iat), to_timestamp(exp), token, key_thumbprint, stream_seq FROM unnest(
      ${textArray(unique.map((a) => a.event.claims.iss))}::text[],
      ${textArray(unique.map((a) => a.event.claims.jti))}::text[],
      ${textArray(unique.map((a) => a.event.claims.grp))}::text[],
      ${numberArray(unique.map((a) => a.event.claims.iat))}::float8[],
      ${numberArray(unique.map((a) => a.event.claims.exp))}::float8[],
      -- A verified token is three base64url parts joined by dots: no comma, and
      -- string_to_array is cheaper for Postgres than parsing a quoted literal.
      -- The tokens go as one binary parameter, joined from their bytes off the heap.
      string_to_array(${joinTokens(unique)}::text, ','),
      ${textArray(unique.map((a) => a.event.key.thumbprint))}::text[],
      ${numberArray(unique.map((a) => a.streamSeq))}::bigint[]
    ) AS v(iss, jti, grp, iat, exp, token, key_thumbprint, stream_seq)
    ON CONFLICT (iss, jti) DO NOTHING
    RETURNING iss, jti`);
  await keysStored;
  const isNew = new Set((await insertedRows).map((r) => `${r.iss}\u0000${r.jti}`));
  return unique.filter((a) => isNew.has(eventKey(a)));
}

const COMMA = Buffer.from(",");

function joinTokens(events: readonly AcceptedInput[]): Buffer {
  const parts: Uint8Array[] = [];
  for (const a of events) {
    if (parts.length > 0) parts.push(COMMA);
    parts.push(a.event.bytes);
  }
  return Buffer.concat(parts);
}

interface DecisionInputs {
  /** The addressed clients that exist, locked, by id. */
  readonly clients: ReadonlyMap<string, LockedClient>;
  readonly capabilities: ReadonlyMap<string, CapabilityBinding>;
  readonly blocks: ReadonlyMap<string, { servers: Set<string>; groups: Set<string> }>;
  /** Senders' buckets (rate limits on), read without a lock; a missing one counts as full. */
  readonly senders: BucketState;
}

/**
 * Statement 2: locks every client the batch's events address that exists, in
 * id order (the lock both proves the client exists at commit time and orders
 * its cursors), and reads the facts the decisions need, as one row of JSON. Missing sender buckets
 * are created full; the read's snapshot predates that insert, so each comes from
 * one side or, if another batch is creating it right now, from neither.
 */
async function readForDecisions(tx: Tx, events: readonly AcceptedInput[], limits: RateLimits | undefined, now: number): Promise<DecisionInputs> {
  const ids = [...new Set(events.flatMap((a) => a.event.claims.rcpt.map((r) => r.cid)))].sort();
  const byHash = new Map<string, string>();
  for (const a of events) for (const r of a.event.claims.rcpt) if (r.cap !== undefined) byHash.set(capabilityHashHex(r.cap), r.cap);
  const senders = limits ? [...new Set(events.map((a) => a.event.claims.iss))].sort() : [];
  const senderKeys = senders.map((iss) => bucketKey("sender", iss, ""));
  if (ids.length === 0 && senders.length === 0) return { clients: new Map(), capabilities: new Map(), blocks: new Map(), senders: new Map() };
  const rows = await tx.rows(sql<{
    clients: [string, number, StoredBuckets][];
    capabilities: [string, string, string, string, boolean][];
    blocks: [string, "server" | "group", string][];
    senders: [string, number, number][];
  }>`
    WITH locked AS (
      SELECT id, delivery_seq, buckets FROM clients WHERE id IN (SELECT unnest(${textArray(ids)}::text[])) ORDER BY id FOR UPDATE
    ), created AS (
      INSERT INTO rate_buckets (key, tokens, updated_at)
      SELECT * FROM unnest(${textArray(senderKeys)}::text[], ${numberArray(senders.map((iss) => limitFor(limits!, "sender", iss, "").burst))}::float8[],
                           ${numberArray(senders.map(() => now))}::float8[])
      ON CONFLICT (key) DO NOTHING
      RETURNING key, tokens, updated_at
    )
    SELECT
      (SELECT coalesce(json_agg(json_build_array(id, delivery_seq, buckets)), '[]') FROM locked) AS clients,
      (SELECT coalesce(json_agg(json_build_array(encode(hash, 'hex'), client_id, grp, owner, revoked_at IS NOT NULL)), '[]') FROM capabilities
        WHERE hash = ANY(SELECT decode(h, 'hex') FROM unnest(${textArray([...byHash.keys()])}::text[]) AS h)) AS capabilities,
      (SELECT coalesce(json_agg(json_build_array(client_id, kind, target)), '[]') FROM client_blocks
        WHERE client_id IN (SELECT unnest(${textArray(ids)}::text[]))) AS blocks,
      (SELECT coalesce(json_agg(json_build_array(key, tokens, updated_at)), '[]') FROM (
        SELECT * FROM created UNION ALL SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray(senderKeys)}::text[])) AS s) AS senders`);
  const row = rows[0]!;
  const blocks = new Map<string, { servers: Set<string>; groups: Set<string> }>();
  for (const [cid, kind, target] of row.blocks) {
    const entry = blocks.get(cid) ?? { servers: new Set<string>(), groups: new Set<string>() };
    (kind === "server" ? entry.servers : entry.groups).add(target);
    blocks.set(cid, entry);
  }
  return {
    clients: new Map(row.clients.map(([id, cursor, buckets]) => [id, { id, cursor: Number(cursor), buckets }])),
    capabilities: new Map(row.capabilities.map(([hash, clientId, grp, owner, revoked]) => [byHash.get(hash)!, { clientId, grp, owner, revoked }])),
    blocks,
    senders: new Map(row.senders.map(([key, tokens, updatedAt]) => [key, { tokens, updatedAt }])),
  };
}

/**
 * Statement 3: everything decided, and the senders' conditional charges; fails
 * with SENDER_BUCKET_RACE unless each of those charges was made.
 */
function writeStatement(plan: Plan, refused: readonly RefusedInput[], now: number, channel: string): RawBuilder<{ charged: number }> {
  const { deliveries: d, refusals: r, senderCharges: charges } = plan;
  const exact = [...plan.senderBuckets];
  const woken = [...new Set(d.client)].join("\n");
  const notify = woken.length <= MAX_NOTIFY_PAYLOAD ? woken : "*";
  // Only the parts this batch has something for: Postgres plans and runs every part it is sent,
  // empty or not, and most batches have no refusals, nothing taken back and no sender locked
  // (measured, batches of 16: ~0.2 ms of Postgres CPU a batch). Each combination is its own
  // prepared statement; there are a handful.
  const parts: RawBuilder<unknown>[] = [];
  if (d.client.length > 0) parts.push(sql`delivered AS (
      INSERT INTO deliveries (client_id, seq, iss, jti)
      SELECT * FROM unnest(${textArray(d.client)}::text[], ${numberArray(d.seq)}::bigint[], ${textArray(d.iss)}::text[], ${textArray(d.jti)}::text[])
    )`);
  if (plan.clients.length > 0) parts.push(sql`cursors AS (
      -- {id: [cursor, buckets?]}: the buckets are JSON already.
      UPDATE clients SET delivery_seq = (v.value->>0)::bigint, buckets = coalesce(v.value->1, clients.buckets)
      FROM jsonb_each(${JSON.stringify(Object.fromEntries(plan.clients))}::jsonb) AS v
      WHERE clients.id = v.key
    )`);
  if (r.client.length > 0) parts.push(sql`refusals AS (
      INSERT INTO recipient_refusals (client_id, reason, iss, jti)
      SELECT * FROM unnest(${textArray(r.client)}::text[], ${textArray(r.reason)}::text[], ${textArray(r.iss)}::text[], ${textArray(r.jti)}::text[])
    )`);
  if (plan.takenBack.length > 0) parts.push(sql`taken_back AS (
      DELETE FROM events WHERE (iss, jti) IN (SELECT * FROM unnest(
        ${textArray(plan.takenBack.map((a) => a.event.claims.iss))}::text[], ${textArray(plan.takenBack.map((a) => a.event.claims.jti))}::text[]))
    )`);
  if (refused.length > 0) parts.push(sql`invalid AS (
      INSERT INTO refused_events (stream_seq, subject, reason, detail, claimed_iss, claimed_jti, sample)
      SELECT * FROM unnest(
        ${numberArray(refused.map((e) => e.streamSeq))}::bigint[],
        ${refused.map((e) => e.subject)}::text[],
        ${refused.map((e) => e.reason)}::text[],
        ${refused.map((e) => e.detail)}::text[],
        ${refused.map((e) => e.claimed?.iss ?? null)}::text[],
        ${refused.map((e) => e.claimed?.jti ?? null)}::text[],
        ${refused.map((e) => e.sample)}::text[]
      )
      ON CONFLICT (stream_seq) DO NOTHING
    )`);
  if (exact.length > 0) parts.push(sql`decided AS (
      -- Senders locked by this transaction: their buckets as decided.
      UPDATE rate_buckets SET tokens = v.tokens, updated_at = v.updated_at
      FROM unnest(${textArray(exact.map(([k]) => k))}::text[], ${numberArray(exact.map(([, b]) => b.tokens))}::float8[],
                  ${numberArray(exact.map(([, b]) => b.updatedAt))}::float8[]) AS v(key, tokens, updated_at)
      WHERE rate_buckets.key = v.key
    )`);
  if (charges.length > 0) parts.push(sql`charged AS (
      -- Senders read without a lock: charged where the bucket still covers the batch (the refill
      -- mirrors refill() in policy/rate-limit.ts), the row locked from here to the commit.
      UPDATE rate_buckets AS b
      SET tokens = least(v.burst, b.tokens + greatest(0, ${now}::float8 - b.updated_at) * v.rate) - v.charged,
          updated_at = greatest(${now}::float8, b.updated_at)
      FROM unnest(${textArray(charges.map((c) => c.key))}::text[], ${numberArray(charges.map((c) => c.limit.rate))}::float8[], ${numberArray(charges.map((c) => c.limit.burst))}::float8[],
                  ${numberArray(charges.map((c) => c.charged))}::float8[], ${numberArray(charges.map((c) => c.needed))}::float8[]) AS v(key, rate, burst, charged, needed)
      WHERE b.key = v.key AND least(v.burst, b.tokens + greatest(0, ${now}::float8 - b.updated_at) * v.rate) >= v.needed
      RETURNING 1
    )`);
  const charged = charges.length > 0 ? sql`sender_bucket_race(${charges.length}, (SELECT count(*)::int FROM charged))` : sql`0`;
  return sql<{ charged: number }>`
    ${parts.length > 0 ? sql`WITH ${sql.join(parts, sql`, `)}` : sql``}
    SELECT ${charged} AS charged${woken === "" ? sql`` : sql`, pg_notify(${channel}, ${notify})`}`;
}

interface Charges {
  /** Events over their sender's limit, to redeliver after this many seconds. */
  readonly delays: Map<AcceptedInput, number>;
  readonly senderCharges: SenderCharge[];
  readonly senderBuckets: Map<string, { tokens: number; updatedAt: number }>;
  /** New buckets of the clients charged, in their stored form. */
  readonly clientBuckets: Map<string, StoredBuckets>;
}

const noCharges = (): Charges => ({ delays: new Map(), senderCharges: [], senderBuckets: new Map(), clientBuckets: new Map() });

/**
 * Charges the buckets of every candidate delivery, in batch order, and moves
 * rate-limited recipients into the refusals. Returns the events to delay (over
 * their sender's limit and not yet waiting longer than allowed), with how long;
 * the senders' charges, left to the last statement unless their buckets were
 * locked here (`lockSenders`, or an event met one short), then their new state;
 * and the new buckets of the clients charged, for their row's update. Client
 * rows are locked already, so their buckets are exact.
 */
async function chargeRateLimits(
  tx: Tx,
  decisions: Map<AcceptedInput, RecipientDecision>,
  limits: RateLimits,
  now: number,
  lockSenders: boolean,
  read: DecisionInputs,
): Promise<Charges> {
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
  if (senders.size === 0) return noCharges();
  const senderKeys = [...senders.keys()].sort();

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
    const fresh = await tx.rows(sql<{ key: string; tokens: number; updated_at: number }>`
      SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray(senderKeys)}::text[]) ORDER BY key FOR UPDATE`);
    for (const r of fresh) before.set(r.key, { tokens: r.tokens, updatedAt: r.updated_at });
    result = charge();
  }
  for (const [a, d] of result.outcome) decisions.set(a, d);

  const changed = locked ? senderKeys.filter((k) => result.state.get(k) !== before.get(k)) : [];
  const senderBuckets = new Map(changed.map((k) => [k, result.state.get(k)!]));
  const senderCharges = locked ? [] : senderKeys.flatMap((key): SenderCharge[] => {
    const iss = senders.get(key)!;
    const sum = result.perSender.get(iss);
    return sum ? [{ key, limit: limitFor(limits, "sender", iss, ""), ...sum }] : [];
  });
  return { delays: result.delays, senderCharges, senderBuckets, clientBuckets: chargedClients(result.state, before, read.clients, limits, now) };
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

function limitedDecision(d: RecipientDecision, limited: ReadonlySet<string>): RecipientDecision {
  const reason: RecipientReason = "rate_limited";
  return {
    accepted: d.accepted.filter((c) => !limited.has(c)),
    refused: [...d.refused, ...d.accepted.filter((c) => limited.has(c)).map((cid) => ({ cid, reason }))],
  };
}

