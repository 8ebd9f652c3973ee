/**
 * The one write of the receive path: a batch of verified events, their
 * deliveries, refusals and rate-limit charges, in a single transaction of three
 * statements (src/receive/statements.ts), decided in between by a pure planner
 * (src/receive/plan.ts). Acknowledgements to JetStream are released only after
 * it commits (src/receive/batch.ts).
 *
 * Lock order. Locks are taken in one global order, so concurrent batches queue
 * rather than deadlock: event keys (sorted), then client rows (sorted), and the
 * senders' buckets last. Expected races, and why they are fine:
 * - an event already stored (redelivery, a second worker, a retried publish):
 *   ON CONFLICT (iss, jti) DO NOTHING, and it is reported as a duplicate;
 * - two batches delivering to the same clients: the client row lock orders
 *   their cursors by commit, and makes the charge of the client's own buckets
 *   (kept in its row) exact;
 * - a revocation committed while the batch waits for a client lock: the batch
 *   decided on what it read first, as if it had committed a moment earlier.
 *
 * Pipelining. Every round trip is latency under load, and rows stay locked for
 * it: BEGIN goes out with statements 1 and 2 in one write, and COMMIT right
 * behind statement 3, so a batch costs two round trips (three when it locks a
 * senders' buckets first), and its row locks are released as soon as statement
 * 3 has run. So statement 2 cannot wait for statement 1 to say which events are
 * new: it locks the clients of all of them (a duplicate's are locked and left).
 *
 * Senders' buckets. A sender's bucket is one row every batch from that sender
 * charges, so every worker would queue on it for the rest of the transaction.
 * It is read without a lock and charged by the last statement instead, on the
 * condition that it still holds enough tokens for every candidate of the batch:
 * then no event would have been delayed by the bucket as it is at commit, and
 * every decision stands. If it does not (a sender close to its limit, charged
 * concurrently), the transaction is rolled back and the batch runs again with
 * the sender's bucket locked before anything is decided.
 */
import { createHash } from "node:crypto";
import type { Writable } from "node:stream";
import type { RawBuilder } from "kysely";
import type pg from "pg";
import type { Db } from "../store/db.ts";
import { planBatch, type Plan } from "./plan.ts";
import { insertEvents, insertKeys, lockSenders, readForDecisions, writeDecisions } from "./statements.ts";
import { eventKey, type AcceptedInput, type CommitOptions, type EventOutcome, type RefusedInput } from "./types.ts";

export type { AcceptedInput, CommitOptions, EventOutcome, RefusedInput } from "./types.ts";

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
      const written = run(writeDecisions(plan, refused, options.now, db.schema, options.queueReports ?? false));
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

/** Statements 1 and 2, then the plan (after statement 2b, if the planner asks for the senders locked). */
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
  // Close to a sender's limit: decide on its bucket as it is, and hold it until commit.
  const locking = lockSenders(first.keys);
  const second = planBatch(inputs, { lockFirst, lockedSenders: locking.decode(await run(locking.statement)) });
  if (second.kind !== "plan") throw new Error("planBatch asked for the senders' lock twice");
  return second.plan;
}
