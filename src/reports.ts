/**
 * Delivery reports (DESIGN §8), both ways: the destination reports what it
 * stored (src/report-publisher.ts publishes them); the sender verifies and
 * records those it receives, and wakes a fan-out request waiting for them.
 */
import type { JsMsg } from "@nats-io/jetstream";
import { sql } from "kysely";
import type { Logger } from "pino";
import type { RecipientReason } from "./errors.ts";
import { storedClaims } from "./protocol/claims.ts";
import { verifyReport } from "./protocol/report.ts";
import { senderOfSubject } from "./protocol/subjects.ts";
import type { KeyResolver } from "./protocol/verify.ts";
import type { Db } from "./store/db.ts";

export interface ReportItem {
  readonly sender: string;
  readonly ref: string;
  readonly accepted: readonly string[];
  readonly refused: readonly { cid: string; reason: RecipientReason }[];
}

/**
 * Reports, built from what the commit stored (a duplicate's repeats the
 * original decision): the original event's recipients (its stored token, not
 * the duplicate's claims, which a retry may have changed) less the recorded
 * refusals; or, for an event nobody received, the refusals its record keeps.
 */
export async function storedDecisions(db: Db, events: readonly { iss: string; jti: string }[]): Promise<ReportItem[]> {
  if (events.length === 0) return [];
  const keys = sql`(SELECT * FROM unnest(${events.map((e) => e.iss)}::text[], ${events.map((e) => e.jti)}::text[]))`;
  const [originals, refusals] = await Promise.all([
    sql<{ iss: string; jti: string; token: string | null; refused: [string, RecipientReason][] | null }>`
      SELECT iss, jti, token, refused FROM events WHERE (iss, jti) IN ${keys}`.execute(db.kysely),
    sql<{ iss: string; jti: string; client_id: string; reason: RecipientReason }>`
      SELECT iss, jti, client_id, reason FROM recipient_refusals WHERE (iss, jti) IN ${keys}`.execute(db.kysely),
  ]);
  const refusedBy = new Map<string, Map<string, RecipientReason>>();
  for (const r of refusals.rows) {
    const key = `${r.iss}\n${r.jti}`;
    if (!refusedBy.has(key)) refusedBy.set(key, new Map());
    refusedBy.get(key)!.set(r.client_id, r.reason);
  }
  return originals.rows.map((e) => {
    if (e.token === null) {
      return { sender: e.iss, ref: e.jti, accepted: [], refused: (e.refused ?? []).map(([cid, reason]) => ({ cid, reason })) };
    }
    const reasons = refusedBy.get(`${e.iss}\n${e.jti}`) ?? new Map<string, RecipientReason>();
    // In the event's recipient order, as the commit decided them.
    const cids = storedClaims(e.token).rcpt.map((r) => r.cid);
    return {
      sender: e.iss, ref: e.jti,
      accepted: cids.filter((c) => !reasons.has(c)),
      refused: cids.filter((c) => reasons.has(c)).map((cid) => ({ cid, reason: reasons.get(cid)! })),
    };
  });
}

function isDataError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && code.startsWith("22");
}

export interface StoredReport {
  readonly server: string;
  readonly event: string;
  readonly accepted: readonly string[];
  readonly refused: readonly { cid: string; reason: string }[];
}

/** Records verified reports; the notification wakes fan-out requests waiting on `report:<ref>`. */
export function createReportRecorder(deps: { self: string; db: Db; keys: KeyResolver; log: Logger }): { handle(batch: JsMsg[]): Promise<void> } {
  return {
    async handle(batch) {
      for (const m of batch) {
        const token = Buffer.from(m.data).toString("latin1");
        const verdict = await verifyReport(m.data, senderOfSubject(m.subject, "report"), { self: deps.self, keys: deps.keys, receivedAt: m.info.timestampNanos / 1e9 });
        if (!verdict.ok && verdict.retryMs !== undefined) {
          // Its key is being fetched: the report waits, the others go on.
          m.nak(verdict.retryMs);
          continue;
        }
        if (!verdict.ok) {
          deps.log.warn({ subject: m.subject, detail: verdict.detail }, "report refused");
          m.term(verdict.detail);
          continue;
        }
        const c = verdict.claims;
        try {
          await deps.db.kysely.transaction().execute(async (trx) => {
            await trx.insertInto("reports").values({
              destination: c.iss, ref: c.ref, jti: c.jti, accepted: JSON.stringify(c.accepted), refused: JSON.stringify(c.refused), token,
            }).onConflict((oc) => oc.columns(["destination", "ref"]).doNothing()).execute();
            await sql`SELECT pg_notify(${deps.db.schema}, ${`report:${c.ref}`})`.execute(trx);
          });
          m.ack();
        } catch (err) {
          // A value Postgres refuses (SQLSTATE class 22: data) will be refused every time: a report
          // that cannot be stored is dropped, not retried until it blocks the consumer.
          if (isDataError(err)) {
            deps.log.warn({ err, subject: m.subject }, "report refused by the database; dropped");
            m.term("unstorable");
            continue;
          }
          deps.log.error({ err }, "recording a report failed; will retry");
          m.nak(1000);
        }
      }
    },
  };
}

export async function reportsFor(db: Db, refs: readonly string[]): Promise<StoredReport[]> {
  if (refs.length === 0) return [];
  const rows = await db.kysely.selectFrom("reports").select(["destination", "ref", "accepted", "refused"])
    .where("ref", "in", [...refs]).orderBy("destination").execute();
  return rows.map((r) => ({ server: r.destination, event: r.ref, accepted: r.accepted, refused: r.refused }));
}
