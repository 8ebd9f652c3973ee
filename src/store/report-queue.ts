/**
 * The queue of delivery reports to send (migrations/010): rows written by the
 * commit that decided their events, claimed by a worker's report loop for a
 * lease, deleted once sent, put off after a failure. Claiming with SKIP LOCKED
 * and a lease lets every worker take part, and a worker that dies leaves its
 * claims to be taken again when their lease runs out.
 */
import { sql } from "kysely";
import { numberArray, textArray } from "./arrays.ts";
import type { Db } from "./db.ts";

export interface QueuedReport {
  readonly iss: string;
  readonly jti: string;
  /** Attempts so far, this one included. */
  readonly attempts: number;
}

/**
 * Up to `limit` reports that are due, oldest first, each claimed for
 * `leaseSeconds`; at most `room.get(peer) ?? perPeer` for one peer, none for
 * the peers in `skip` (at their share of reports in flight). Rows looked at and
 * not claimed stay due: only their lock is taken, and given back at once.
 */
export async function claimReports(
  db: Db,
  options: { limit: number; perPeer: number; room: ReadonlyMap<string, number>; skip: readonly string[]; leaseSeconds: number },
): Promise<QueuedReport[]> {
  const room = [...options.room];
  const { rows } = await sql<QueuedReport>`
    WITH due AS (
      SELECT iss, jti FROM report_queue
      WHERE due_at <= now() AND iss <> ALL(${textArray(options.skip)}::text[])
      ORDER BY due_at LIMIT ${options.limit} FOR UPDATE SKIP LOCKED
    ), ranked AS (
      SELECT iss, jti, row_number() OVER (PARTITION BY iss) AS n FROM due
    )
    UPDATE report_queue AS q SET due_at = now() + make_interval(secs => ${options.leaseSeconds}), attempts = q.attempts + 1
    FROM ranked LEFT JOIN unnest(${textArray(room.map(([peer]) => peer))}::text[], ${numberArray(room.map(([, n]) => n))}::int[]) AS room(iss, n)
      ON room.iss = ranked.iss
    WHERE q.iss = ranked.iss AND q.jti = ranked.jti AND ranked.n <= coalesce(room.n, ${options.perPeer})
    RETURNING q.iss, q.jti, q.attempts`.execute(db.kysely);
  return rows;
}

/** Reports sent: gone from the queue. */
export async function forgetReports(db: Db, sent: readonly { iss: string; jti: string }[]): Promise<void> {
  if (sent.length === 0) return;
  await sql`DELETE FROM report_queue WHERE (iss, jti) IN (SELECT * FROM unnest(${textArray(sent.map((r) => r.iss))}::text[], ${textArray(sent.map((r) => r.jti))}::text[]))`
    .execute(db.kysely);
}

/**
 * A peer whose report stream failed: none of its reports is due for
 * `delaySeconds`, so claims stop reading past them (and the ones that failed
 * are tried again then).
 */
export async function putOffPeer(db: Db, peer: string, delaySeconds: number): Promise<void> {
  await sql`
    UPDATE report_queue SET due_at = now() + make_interval(secs => ${delaySeconds})
    WHERE iss = ${peer} AND due_at < now() + make_interval(secs => ${delaySeconds})`.execute(db.kysely);
}

/**
 * Drops reports queued longer than `maxAgeSeconds` (their sender's report
 * stream keeps a week), and a peer's oldest past its `maxPerPeer` newest (its
 * report stream could not hold more); returns how many.
 */
export async function trimReportQueue(db: Db, options: { maxAgeSeconds: number; maxPerPeer: number }): Promise<number> {
  const result = await sql`
    DELETE FROM report_queue AS q USING (
      SELECT iss, jti FROM (
        SELECT iss, jti, queued_at, row_number() OVER (PARTITION BY iss ORDER BY queued_at DESC, jti) AS n FROM report_queue
      ) AS r WHERE n > ${options.maxPerPeer} OR queued_at < now() - make_interval(secs => ${options.maxAgeSeconds})
    ) AS old
    WHERE q.iss = old.iss AND q.jti = old.jti`.execute(db.kysely);
  return Number(result.numAffectedRows ?? 0);
}

/** Reports waiting, by sender. */
export async function queuedReportsBySender(db: Db): Promise<Map<string, number>> {
  const { rows } = await sql<{ iss: string; n: string }>`SELECT iss, count(*) AS n FROM report_queue GROUP BY iss`.execute(db.kysely);
  return new Map(rows.map((r) => [r.iss, Number(r.n)]));
}
