/**
 * The SQL of a batch's transaction, text first, each statement a function of
 * its inputs (src/receive/commit.ts runs them, in order, on one connection):
 * 1. `insertEvents`: the batch's events, returning those that were new (and the
 *    verifying keys not yet stored);
 * 2. `readForDecisions`: what the decisions need, without a lock;
 *    `lockClients` and `lockSenders` read buckets again under a lock when
 *    asked (and `lockClients` orders the last statement's locks);
 * 3. `writeDecisions`: everything decided (events nobody receives become
 *    records without their body), the clients' cursor bumps and conditional
 *    charges, the senders' conditional charges, the reports to send, and the
 *    NOTIFY that wakes long-polls.
 */
import { sql, type RawBuilder } from "kysely";
import { capabilityHashHex } from "../policy/capabilities.ts";
import { bucketKey, limitFor, type BucketState, type RateLimits } from "../policy/rate-limit.ts";
import type { VerificationKey } from "../protocol/keys.ts";
import { numberArray, textArray } from "../store/arrays.ts";
import type { DecisionInputs, LockedBuckets, Plan, StoredBuckets } from "./plan.ts";
import type { AcceptedInput, RefusedInput } from "./types.ts";

/** NOTIFY payloads are capped at 8000 bytes; past that, wake every waiter. */
const MAX_NOTIFY_PAYLOAD = 7900;
const COMMA = Buffer.from(",");

/**
 * Statement 1b: the verifying keys not stored yet. The key registry binds every key
 * in peer_keys before it is used (src/store/peer-keys.ts), so this inserts nothing
 * in practice; it stays so an event is never stored without its key. Any conflict
 * (the thumbprint, or a kid bound to another key) leaves the bound row as it is.
 */
export function insertKeys(keys: readonly VerificationKey[]): RawBuilder<unknown> {
  return sql`
    INSERT INTO peer_keys (thumbprint, kid, homeserver, jwk)
    SELECT * FROM unnest(${textArray(keys.map((k) => k.thumbprint))}::text[], ${textArray(keys.map((k) => k.kid))}::text[],
                         ${textArray(keys.map((k) => k.homeserver))}::text[], ${textArray(keys.map((k) => JSON.stringify(k.jwk)))}::jsonb[])
    ON CONFLICT DO NOTHING`;
}

/** Statement 1: the batch's events (distinct, in key order), returning the keys of those that were new. */
export function insertEvents(unique: readonly AcceptedInput[]): RawBuilder<{ iss: string; jti: string }> {
  return sql<{ iss: string; jti: string }>`
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
    RETURNING iss, jti`;
}

function joinTokens(events: readonly AcceptedInput[]): Buffer {
  const parts: Uint8Array[] = [];
  for (const a of events) {
    if (parts.length > 0) parts.push(COMMA);
    parts.push(a.event.bytes);
  }
  return Buffer.concat(parts);
}

/** Statement 2's one row of JSON, as read. */
export interface DecisionRow {
  clients: [string, StoredBuckets, string][];
  capabilities: [string, string, string, string, boolean][];
  blocks: [string, "server" | "group", string][];
  senders: [string, number, number][];
}

/**
 * Statement 2: reads the facts the decisions need, as one row of JSON, without
 * a lock: every client the batch's events address that exists (with its
 * buckets), the capabilities presented, the clients' blocks, and the senders'
 * buckets.
 * Missing sender buckets are created full; the read's snapshot predates that
 * insert, so each comes from one side or, if another batch is creating it right
 * now, from neither. `decode` turns the row into the planner's inputs.
 */
export function readForDecisions(events: readonly AcceptedInput[], limits: RateLimits | undefined, now: number): {
  readonly statement: RawBuilder<DecisionRow> | undefined;
  decode(row: DecisionRow | undefined): DecisionInputs;
} {
  const ids = [...new Set(events.flatMap((a) => a.event.claims.rcpt.map((r) => r.cid)))].sort();
  const byHash = new Map<string, string>();
  for (const a of events) for (const r of a.event.claims.rcpt) if (r.cap !== undefined) byHash.set(capabilityHashHex(r.cap), r.cap);
  const senders = limits ? [...new Set(events.map((a) => a.event.claims.iss))].sort() : [];
  const senderKeys = senders.map((iss) => bucketKey("sender", iss, ""));
  const decode = (row: DecisionRow | undefined): DecisionInputs => {
    if (!row) return { clients: new Map(), capabilities: new Map(), blocks: new Map(), senders: new Map() };
    const blocks = new Map<string, { servers: Set<string>; groups: Set<string> }>();
    for (const [cid, kind, target] of row.blocks) {
      const entry = blocks.get(cid) ?? { servers: new Set<string>(), groups: new Set<string>() };
      (kind === "server" ? entry.servers : entry.groups).add(target);
      blocks.set(cid, entry);
    }
    return {
      clients: new Map(row.clients.map(([id, buckets, createdAt]) => [id, { id, buckets, createdAt }])),
      capabilities: new Map(row.capabilities.map(([hash, clientId, grp, owner, revoked]) => [byHash.get(hash)!, { clientId, grp, owner, revoked }])),
      blocks,
      senders: new Map(row.senders.map(([key, tokens, updatedAt]) => [key, { tokens, updatedAt }])),
    };
  };
  if (ids.length === 0 && senders.length === 0) return { statement: undefined, decode };
  const statement = sql<DecisionRow>`
    WITH created AS (
      INSERT INTO rate_buckets (key, tokens, updated_at)
      SELECT * FROM unnest(${textArray(senderKeys)}::text[], ${numberArray(senders.map((iss) => limitFor(limits!, "sender", iss, "").burst))}::float8[],
                           ${numberArray(senders.map(() => now))}::float8[])
      ON CONFLICT (key) DO NOTHING
      RETURNING key, tokens, updated_at
    )
    SELECT
      (SELECT coalesce(json_agg(json_build_array(id, buckets, created_at::text)), '[]') FROM clients WHERE id IN (SELECT unnest(${textArray(ids)}::text[]))) AS clients,
      (SELECT coalesce(json_agg(json_build_array(encode(hash, 'hex'), client_id, grp, owner, revoked_at IS NOT NULL)), '[]') FROM capabilities
        WHERE hash = ANY(SELECT decode(h, 'hex') FROM unnest(${textArray([...byHash.keys()])}::text[]) AS h)) AS capabilities,
      (SELECT coalesce(json_agg(json_build_array(client_id, kind, target)), '[]') FROM client_blocks
        WHERE client_id IN (SELECT unnest(${textArray(ids)}::text[]))) AS blocks,
      (SELECT coalesce(json_agg(json_build_array(key, tokens, updated_at)), '[]') FROM (
        SELECT * FROM created UNION ALL SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray(senderKeys)}::text[])) AS s) AS senders`;
  return { statement, decode };
}

/**
 * Statement 2b (close to a limit, the planner asked), with `lockSenders`
 * behind it: clients locked until commit, in id order, with their buckets.
 */
export function lockClients(ids: readonly string[]): { statement: RawBuilder<{ id: string; buckets: StoredBuckets }>; decode(rows: readonly { id: string; buckets: StoredBuckets }[]): LockedBuckets["clients"] } {
  return {
    statement: sql<{ id: string; buckets: StoredBuckets }>`
      SELECT id, buckets FROM clients WHERE id IN (SELECT unnest(${textArray([...ids])}::text[])) ORDER BY id FOR UPDATE`,
    decode: (rows) => new Map(rows.map((r) => [r.id, r.buckets])),
  };
}

/**
 * Locks clients (sorted ids), then senders' buckets (sorted keys), until commit,
 * reading nothing: before statement 3, whose cursor bumps and charges would lock
 * them in whatever order its joins run (two batches could deadlock, or one and
 * another that locked them in order in statement 2b). One row back.
 */
export function orderLocks(clientIds: readonly string[], senderKeys: readonly string[]): RawBuilder<{ locked: number }> {
  return sql<{ locked: number }>`
    SELECT (SELECT count(*)::int FROM (
              SELECT FROM clients WHERE id IN (SELECT unnest(${textArray([...clientIds])}::text[])) ORDER BY id FOR UPDATE) AS c)
         + (SELECT count(*)::int FROM (
              SELECT FROM rate_buckets WHERE key IN (SELECT unnest(${textArray([...senderKeys])}::text[])) ORDER BY key FOR UPDATE) AS s) AS locked`;
}

/** Statement 2b's second part: the senders' buckets, locked until commit, in key order. */
export function lockSenders(keys: readonly string[]): { statement: RawBuilder<{ key: string; tokens: number; updated_at: number }>; decode(rows: readonly { key: string; tokens: number; updated_at: number }[]): BucketState } {
  return {
    statement: sql<{ key: string; tokens: number; updated_at: number }>`
      SELECT key, tokens, updated_at FROM rate_buckets WHERE key = ANY(${textArray([...keys])}::text[]) ORDER BY key FOR UPDATE`,
    decode: (rows) => new Map(rows.map((r) => [r.key, { tokens: r.tokens, updatedAt: r.updated_at }])),
  };
}

/**
 * Statement 3: everything decided, the clients' cursor bumps and conditional
 * charges, and the senders' conditional charges; fails with FR001
 * (charge_client_buckets, migrations/012; sender_bucket_race, migrations/007)
 * unless each of those charges was made.
 */
export function writeDecisions(plan: Plan, refused: readonly RefusedInput[], now: number, channel: string, queueReports: boolean): RawBuilder<{ charged: number }> {
  const { deliveries: d, refusals: r, senderCharges: charges } = plan;
  const exact = [...plan.senderBuckets];
  const woken = [...new Set(d.client)].join("\n");
  const notify = woken.length <= MAX_NOTIFY_PAYLOAD ? woken : "*";
  // Only the parts this batch has something for: Postgres plans and runs every part it is sent,
  // empty or not, and most batches have no refusals, nothing taken back and no sender locked
  // (measured, batches of 16: ~0.2 ms of Postgres CPU a batch). Each combination is its own
  // prepared statement; there are a handful.
  const parts: RawBuilder<unknown>[] = [];
  if (plan.clients.length > 0) parts.push(sql`bumped AS (
      -- {id: [deliveries, created_at, charges?]}. The row as it is now: another batch may have
      -- committed to it since statement 2 (READ COMMITTED re-reads it once that batch's lock is
      -- released). Only the client statement 2 read: one removed and registered again since is
      -- another client, whom the batch's decisions (its capabilities, its blocks) were not about.
      UPDATE clients SET delivery_seq = clients.delivery_seq + (v.value->>0)::bigint,
        buckets = CASE WHEN v.value->2 IS NULL THEN clients.buckets ELSE charge_client_buckets(clients.buckets, v.value->2, ${now}::float8) END
      FROM jsonb_each(${JSON.stringify(Object.fromEntries(plan.clients))}::jsonb) AS v
      WHERE clients.id = v.key AND clients.created_at = (v.value->>1)::timestamptz
      RETURNING clients.id, clients.delivery_seq - (v.value->>0)::bigint AS cursor
    )`);
  // A client removed since statement 2 (or removed and registered again) is not bumped, and gets
  // no delivery: as if it were removed just after this commit (removeClient deletes its deliveries).
  if (d.client.length > 0) parts.push(sql`delivered AS (
      INSERT INTO deliveries (client_id, seq, iss, jti)
      SELECT v.client, bumped.cursor + v.ordinal, v.iss, v.jti
      FROM unnest(${textArray(d.client)}::text[], ${numberArray(d.ordinal)}::bigint[], ${textArray(d.iss)}::text[], ${textArray(d.jti)}::text[]) AS v(client, ordinal, iss, jti)
      JOIN bumped ON bumped.id = v.client
    )`);
  if (r.client.length > 0) parts.push(sql`refusals AS (
      INSERT INTO recipient_refusals (client_id, reason, iss, jti)
      SELECT * FROM unnest(${textArray(r.client)}::text[], ${textArray(r.reason)}::text[], ${textArray(r.iss)}::text[], ${textArray(r.jti)}::text[])
    )`);
  if (plan.records.iss.length > 0) parts.push(sql`records AS (
      -- Inserted by statement 1 with their body; kept as records (migrations/011). The old row's
      -- token is what SET reads: its hash and size stay.
      UPDATE events SET token = NULL, token_sha256 = sha256(convert_to(events.token, 'UTF8')), token_bytes = octet_length(events.token), refused = v.refused
      FROM unnest(${textArray(plan.records.iss)}::text[], ${textArray(plan.records.jti)}::text[], ${textArray(plan.records.refused)}::jsonb[]) AS v(iss, jti, refused)
      WHERE events.iss = v.iss AND events.jti = v.jti
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
  if (queueReports && plan.reported.iss.length > 0) parts.push(sql`queued AS (
      -- The reports, sent by their own loop once this commits (migrations/010).
      INSERT INTO report_queue (iss, jti) SELECT * FROM unnest(${textArray(plan.reported.iss)}::text[], ${textArray(plan.reported.jti)}::text[])
      ON CONFLICT (iss, jti) DO NOTHING
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
