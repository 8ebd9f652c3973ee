/**
 * Retention of what was refused (config `retention`): the records of events
 * nobody received (migrations/011) and the events refused outright
 * (refused_events) are kept for audits and abuse disputes, then deleted here,
 * oldest first, a bounded number a round so that a worker's round stays short
 * and workers running it together skip each other's rows.
 */
import { sql } from "kysely";
import type { Db } from "./db.ts";

export interface RetentionRound {
  readonly records: number;
  readonly refusedEvents: number;
}

/**
 * Deletes up to `limit` of each kind older than `retentionSeconds`. A record is
 * also the dedupe of its event (events' primary key): it stays, whatever the
 * retention, until no copy of its event could still be accepted. A copy is
 * judged as of when the inbox stored it (src/receive/batch.ts), so that is once
 * the event expired (`expires_at`, with `graceSeconds` for the clocks'
 * disagreement) before `oldestWaiting`, the oldest message still in the inbox:
 * any copy waiting there, or yet to come, is then refused `expired`.
 */
export async function pruneRefused(
  db: Db,
  options: { retentionSeconds: number; graceSeconds: number; limit: number; oldestWaiting: Date },
): Promise<RetentionRound> {
  const age = sql`now() - make_interval(secs => ${options.retentionSeconds})`;
  const records = await sql`
    DELETE FROM events WHERE (iss, jti) IN (
      SELECT iss, jti FROM events
      WHERE token IS NULL AND received_at < ${age}
        AND expires_at < least(now(), ${options.oldestWaiting.toISOString()}::timestamptz) - make_interval(secs => ${options.graceSeconds})
      ORDER BY received_at LIMIT ${options.limit} FOR UPDATE SKIP LOCKED
    )`.execute(db.kysely);
  const refused = await sql`
    DELETE FROM refused_events WHERE stream_seq IN (
      SELECT stream_seq FROM refused_events WHERE at < ${age} ORDER BY at LIMIT ${options.limit} FOR UPDATE SKIP LOCKED
    )`.execute(db.kysely);
  return { records: Number(records.numAffectedRows ?? 0), refusedEvents: Number(refused.numAffectedRows ?? 0) };
}
