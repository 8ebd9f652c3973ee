/**
 * The one write of the receive path: a batch of verified events, their
 * deliveries and refusals, in a single transaction. Acknowledgements to
 * JetStream are released only after it commits.
 *
 * Expected races, and why they are fine:
 * - an event already stored (redelivery, a second worker, a retried publish):
 *   ON CONFLICT (iss, jti) DO NOTHING, and it is reported as a duplicate;
 * - two batches delivering to the same clients: client rows are locked in id
 *   order, so they queue rather than deadlock, and each client's cursors
 *   follow commit order.
 */
import { sql, type Transaction } from "kysely";
import type { EventReason } from "../errors.ts";
import { decideRecipients, type RecipientDecision } from "../policy/recipients.ts";
import type { VerifiedEvent } from "../protocol/verify.ts";
import { loadRecipientFacts } from "./capabilities.ts";
import type { Db } from "./db.ts";
import type { Database } from "./schema.ts";

export interface AcceptedInput {
  readonly streamSeq: number;
  readonly event: VerifiedEvent;
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
  | { readonly streamSeq: number; readonly status: "duplicate" };

/** NOTIFY payloads are capped at 8000 bytes; past that, wake every waiter. */
const MAX_NOTIFY_PAYLOAD = 7900;

export async function commitBatch(
  db: Db,
  accepted: readonly AcceptedInput[],
  refused: readonly RefusedInput[],
): Promise<EventOutcome[]> {
  return db.kysely.transaction().execute(async (trx) => {
    const outcomes = await storeEvents(trx, accepted);
    if (refused.length > 0) await recordRefusedEvents(trx, refused);
    const woken = new Set<string>();
    for (const o of outcomes) if (o.status === "stored") for (const cid of o.decision.accepted) woken.add(cid);
    if (woken.size > 0) {
      const payload = [...woken].join("\n");
      await sql`SELECT pg_notify(${db.schema}, ${payload.length <= MAX_NOTIFY_PAYLOAD ? payload : "*"})`.execute(trx);
    }
    return outcomes;
  });
}

async function storeEvents(trx: Transaction<Database>, accepted: readonly AcceptedInput[]): Promise<EventOutcome[]> {
  // The same event twice in one batch (a redelivery racing its original) is stored once.
  const firstOf = new Map<string, AcceptedInput>();
  for (const a of accepted) {
    const id = `${a.event.claims.iss}\u0000${a.event.claims.jti}`;
    if (!firstOf.has(id)) firstOf.set(id, a);
  }
  // Sorted, so concurrent batches take the unique-index locks in one order and never deadlock.
  const unique = [...firstOf.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([, a]) => a);
  if (unique.length === 0) return accepted.map((a) => ({ streamSeq: a.streamSeq, status: "duplicate" as const }));

  const keys = new Map(unique.map((a) => [a.event.key.thumbprint, a.event.key]));
  await trx
    .insertInto("peer_keys")
    .values([...keys.values()].map((k) => ({ thumbprint: k.thumbprint, kid: k.kid, homeserver: k.homeserver, jwk: JSON.stringify(k.jwk) })))
    .onConflict((oc) => oc.column("thumbprint").doNothing())
    .execute();

  const inserted = await sql<{ iss: string; jti: string }>`
    INSERT INTO events (iss, jti, grp, issued_at, expires_at, token, key_thumbprint, stream_seq)
    SELECT * FROM unnest(
      ${unique.map((a) => a.event.claims.iss)}::text[],
      ${unique.map((a) => a.event.claims.jti)}::text[],
      ${unique.map((a) => a.event.claims.grp)}::text[],
      ${unique.map((a) => new Date(a.event.claims.iat * 1000).toISOString())}::timestamptz[],
      ${unique.map((a) => new Date(a.event.claims.exp * 1000).toISOString())}::timestamptz[],
      ${unique.map((a) => a.event.token)}::text[],
      ${unique.map((a) => a.event.key.thumbprint)}::text[],
      ${unique.map((a) => a.streamSeq)}::bigint[]
    )
    ON CONFLICT (iss, jti) DO NOTHING
    RETURNING iss, jti`.execute(trx);
  const isNew = new Set(inserted.rows.map((r) => `${r.iss}\u0000${r.jti}`));
  const stored = unique.filter((a) => isNew.has(`${a.event.claims.iss}\u0000${a.event.claims.jti}`));

  // Lock every addressed client that exists, in id order: the lock both proves
  // the client exists at commit time and orders its cursors.
  const candidates = [...new Set(stored.flatMap((a) => a.event.claims.rcpt.map((r) => r.cid)))].sort();
  const locked = candidates.length === 0 ? [] : (
    await sql<{ id: string; delivery_seq: string }>`
      SELECT id, delivery_seq FROM clients WHERE id = ANY(${candidates}::text[]) ORDER BY id FOR UPDATE`.execute(trx)
  ).rows;
  const nextSeq = new Map(locked.map((r) => [r.id, Number(r.delivery_seq)]));
  const presented = [...new Set(stored.flatMap((a) => a.event.claims.rcpt.flatMap((r) => (r.cap === undefined ? [] : [r.cap]))))];
  const facts = await loadRecipientFacts(trx, new Set(nextSeq.keys()), presented);

  const decisions = new Map<AcceptedInput, RecipientDecision>();
  const delivery = { client: [] as string[], seq: [] as number[], iss: [] as string[], jti: [] as string[] };
  const refusal = { client: [] as string[], reason: [] as string[], iss: [] as string[], jti: [] as string[] };
  for (const a of stored) {
    const decision = decideRecipients(a.event.claims, facts);
    decisions.set(a, decision);
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
      SELECT * FROM unnest(${delivery.client}::text[], ${delivery.seq}::bigint[], ${delivery.iss}::text[], ${delivery.jti}::text[])`.execute(trx);
    const touched = locked.filter((r) => nextSeq.get(r.id) !== Number(r.delivery_seq));
    await sql`
      UPDATE clients SET delivery_seq = v.seq
      FROM unnest(${touched.map((r) => r.id)}::text[], ${touched.map((r) => nextSeq.get(r.id)!)}::bigint[]) AS v(id, seq)
      WHERE clients.id = v.id`.execute(trx);
  }
  if (refusal.client.length > 0) {
    await sql`
      INSERT INTO recipient_refusals (client_id, reason, iss, jti)
      SELECT * FROM unnest(${refusal.client}::text[], ${refusal.reason}::text[], ${refusal.iss}::text[], ${refusal.jti}::text[])`.execute(trx);
  }

  return accepted.map((a) => {
    const decision = decisions.get(a);
    return decision ? { streamSeq: a.streamSeq, status: "stored" as const, decision } : { streamSeq: a.streamSeq, status: "duplicate" as const };
  });
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
