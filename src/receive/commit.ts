/**
 * The one write of the receive path: a batch of verified events, their
 * deliveries, refusals and rate-limit charges, in a single transaction of three
 * statements (src/receive/statements.ts), decided in between by a pure planner
 * (src/receive/plan.ts). Acknowledgements to JetStream are released only after
 * it commits (src/receive/batch.ts).
 *
 * Late locks. A client's row holds its cursor and its own rate buckets, and a
 * sender's bucket is one row every batch from that sender charges: locked from
 * the read to the commit, every worker's batches to one group's clients would
 * run one after the other (measured, issue 16: a second worker made 10-recipient
 * traffic slower). So statement 2 reads them without a lock, the planner decides
 * on what it read, and the last statement bumps each client's cursor and charges
 * every bucket from the row as it is then, on the condition that the bucket
 * still holds what the batch needed: then no recipient would have been limited
 * and no event delayed by the bucket as it is at commit, and every decision
 * stands. Rows are locked from that statement to COMMIT only. If a bucket no
 * longer holds enough (close to a limit, charged concurrently), the statement
 * fails (FR001), the transaction rolls back, and the batch runs again with the
 * buckets locked and read again before anything is decided; a bucket already
 * short as first read is locked and read again at once (the planner asks).
 *
 * Cursors. A client's deliveries take the next cursors at commit, from its row
 * as bumped under its lock: two batches to one client get theirs in commit
 * order, so a reader never sees a cursor below one it has already read past.
 *
 * Lock order. Locks are taken in one global order, so concurrent batches queue
 * rather than deadlock: event keys (sorted), then client rows (sorted), and the
 * senders' buckets (sorted) last, by orderLocks just before the last statement,
 * or by statement 2b. Expected races, and why they are fine:
 * - an event already stored (redelivery, a second worker, a retried publish):
 *   ON CONFLICT (iss, jti) DO NOTHING, and it is reported as a duplicate;
 * - a revocation committed after statement 2 read the capabilities: the batch
 *   decided on what it read, as if it had committed a moment earlier;
 * - a client removed after statement 2: it is not bumped and gets no delivery,
 *   as if it were removed a moment after the commit; nor does a client
 *   registered again under its id since (the last statement writes to the
 *   registration statement 2 read, by its created_at).
 *
 * Pipelining. Every round trip is latency under load, and rows stay locked for
 * it: BEGIN goes out with statements 1 and 2 in one write, and the clients'
 * locks, statement 3 and COMMIT in the next, so a batch costs two round trips
 * (three when it locks buckets first), and its row locks are held only while
 * the last statement and the COMMIT run. So statement 2 cannot wait for
 * statement 1 to say which events are new: it reads for all of them.
 */
import { createHash } from "node:crypto";
import type { Writable } from "node:stream";
import type { RawBuilder } from "kysely";
import type pg from "pg";
import type { Db } from "../store/db.ts";
import { planBatch, type Plan } from "./plan.ts";
import { insertEvents, insertKeys, lockClients, lockSenders, orderLocks, readForDecisions, writeDecisions } from "./statements.ts";
import { eventKey, type AcceptedInput, type CommitOptions, type EventOutcome, type RefusedInput } from "./types.ts";

export type { AcceptedInput, CommitOptions, EventOutcome, RefusedInput } from "./types.ts";

/** A bucket changed between reading and charging it: run the batch again, locking the buckets first. */
class BucketRace extends Error {}
/** The SQLSTATE sender_bucket_race() and charge_client_buckets() raise (migrations/007, 012). */
const BUCKET_RACE = "FR001";

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
  const poisoned = options.faults && accepted.find((a) => options.faults!.commitFailsFor.has(a.event.claims.jti));
  if (poisoned) throw new TypeError(`injected fault: the commit of ${poisoned.event.claims.jti} fails`);
  const attempt = async (lockFirst: boolean): Promise<EventOutcome[]> => {
    const client = await db.connect();
    const run = async <R>(statement: RawBuilder<R>): Promise<R[]> => {
      const c = statement.compile(db.kysely);
      return (await client.query({ name: statementName(c.sql), text: c.sql, values: c.parameters as unknown[] })).rows as R[];
    };
    // BEGIN's and COMMIT's failures surface from the statements sent with them; they are
    // handled here only so that they are never unhandled.
    let commit: Promise<unknown> | undefined;
    try {
      const socket = corkable(client);
      socket?.cork();
      const begin = client.query("BEGIN");
      begin.catch(() => undefined);
      // Statements 1 and 2 are sent before the first await: BEGIN and both leave in one write.
      const deciding = decide(run, accepted, options, known, lockFirst);
      socket?.uncork();
      const plan = await deciding;
      await begin;
      socket?.cork();
      // The clients' and senders' row locks in order, before statement 3's bumps and charges take them in
      // its joins' order. One sender's bucket is one row, in no cycle: not locked here (measured with
      // bench:commit, one sender: ~0.1–0.2 ms more Postgres CPU a batch when it was).
      const senderKeys = plan.senderCharges.length > 1 ? plan.senderCharges.map((c) => c.key).sort() : [];
      const ordered = plan.clientsLocked || (plan.clients.length === 0 && senderKeys.length === 0)
        ? undefined
        : run(orderLocks(plan.clients.map(([id]) => id).sort(), senderKeys));
      ordered?.catch(() => undefined);
      const written = run(writeDecisions(plan, refused, options.now, db.schema, options.queueReports ?? false));
      // Awaited after `ordered`: if that fails first (a lost connection, a deadlock), this one's
      // rejection must not go unhandled (it would end the process).
      written.catch(() => undefined);
      commit = client.query("COMMIT");
      socket?.uncork();
      commit.catch(() => undefined);
      // A race on a bucket fails the statement (FR001), and the COMMIT behind it rolls back.
      await ordered;
      await written;
      await commit;
      return plan.outcomes;
    } catch (err) {
      if (commit) await commit.catch(() => undefined);
      else await client.query("ROLLBACK").catch(() => undefined);
      throw (err as { code?: string }).code === BUCKET_RACE ? new BucketRace() : err;
    } finally {
      client.release();
    }
  };
  let outcomes: EventOutcome[];
  try {
    outcomes = await attempt(false);
  } catch (err) {
    if (!(err instanceof BucketRace)) throw err;
    options.onBucketRace?.();
    outcomes = await attempt(true);
  }
  // Only once committed is a key known to be stored (a rolled-back insert must be retried).
  for (const a of accepted) known.add(a.event.key.thumbprint);
  return outcomes;
}

/** Statements 1 and 2, then the plan (after statement 2b, if the planner asks for the buckets locked). */
async function decide(
  run: <R>(statement: RawBuilder<R>) => Promise<R[]>,
  accepted: readonly AcceptedInput[],
  options: CommitOptions,
  knownKeys: ReadonlySet<string>,
  lockFirst: boolean,
): Promise<Plan> {
  // The same event twice in one batch (a redelivery racing its original) is stored once.
  const firstOf = new Map<string, AcceptedInput>();
  for (const a of accepted) if (!firstOf.has(eventKey(a))) firstOf.set(eventKey(a), a);
  const unique = [...firstOf.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, a]) => a);
  const limits = options.rateLimits?.enabled ? options.rateLimits : undefined;

  const newKeys = new Map(unique.filter((a) => !knownKeys.has(a.event.key.thumbprint)).map((a) => [a.event.key.thumbprint, a.event.key]));
  const keysStored = newKeys.size === 0 ? undefined : run(insertKeys([...newKeys.values()]));
  keysStored?.catch(() => undefined);
  const inserted = unique.length === 0 ? undefined : run(insertEvents(unique));
  inserted?.catch(() => undefined);
  const read = readForDecisions(unique, limits, options.now);
  const readRows = read.statement ? run(read.statement) : undefined;
  readRows?.catch(() => undefined);
  await keysStored;
  const isNew = new Set((inserted ? await inserted : []).map((r) => `${r.iss}\u0000${r.jti}`));
  const inputs = {
    accepted, stored: unique.filter((a) => isNew.has(eventKey(a))), read: read.decode(readRows ? (await readRows)[0] : undefined),
    limits, now: options.now,
  };
  const first = planBatch(inputs, { lockFirst });
  if (first.kind === "plan") return first.plan;
  // Close to a limit: decide on the buckets as they are, and hold them until commit (clients first).
  const clients = lockClients(first.clients);
  const senders = lockSenders(first.senders);
  const clientRows = run(clients.statement);
  clientRows.catch(() => undefined);
  const senderRows = first.senders.length > 0 ? await run(senders.statement) : [];
  const locked = { clients: clients.decode(await clientRows), senders: senders.decode(senderRows) };
  const second = planBatch(inputs, { lockFirst, locked });
  if (second.kind !== "plan") throw new Error("planBatch asked for the buckets' lock twice");
  return second.plan;
}
