/** A client's pending messages, and its acknowledgements. */
import { sql } from "kysely";
import { RelayError } from "../errors.ts";
import type { Db } from "./db.ts";

export interface StoredMessage {
  readonly cursor: number;
  readonly iss: string;
  readonly jti: string;
  readonly grp: string;
  readonly token: string;
  readonly receivedAt: Date;
}

/** Messages after `after` (default: after the client's last acknowledgement), in cursor order. */
export async function listMessages(db: Db, clientId: string, after: number | undefined, limit: number): Promise<StoredMessage[]> {
  const rows = await db.kysely
    .selectFrom("deliveries as d")
    .innerJoin("events as e", (j) => j.onRef("e.iss", "=", "d.iss").onRef("e.jti", "=", "d.jti"))
    .select(["d.seq", "e.iss", "e.jti", "e.grp", "e.token", "e.received_at"])
    .where("d.client_id", "=", clientId)
    .where("d.seq", ">", after === undefined
      ? sql<string>`(SELECT acked_seq FROM clients WHERE id = ${clientId})`
      : String(after))
    .orderBy("d.seq")
    .limit(limit)
    .execute();
  return rows.map((r) => ({ cursor: Number(r.seq), iss: r.iss, jti: r.jti, grp: r.grp, // A delivery is only ever written for an event kept with its body (migration 011).
    token: r.token!, receivedAt: r.received_at }));
}

/**
 * Marks everything up to `through` as picked up and drops those deliveries (the
 * event itself stays, for non-repudiation). Acknowledging a cursor not yet handed
 * out is refused, so a client cannot skip messages it never saw.
 */
export async function ackThrough(db: Db, clientId: string, through: number): Promise<{ acked: number }> {
  return db.kysely.transaction().execute(async (trx) => {
    const client = await trx
      .selectFrom("clients").select(["delivery_seq", "acked_seq"]).where("id", "=", clientId).forUpdate().executeTakeFirst();
    if (!client) throw new RelayError("unauthorized", `client ${clientId} does not exist`);
    if (through > Number(client.delivery_seq)) {
      throw new RelayError("bad_cursor", `cursor ${through} is past the last message (${client.delivery_seq})`);
    }
    if (through <= Number(client.acked_seq)) return { acked: Number(client.acked_seq) };
    await trx.deleteFrom("deliveries").where("client_id", "=", clientId).where("seq", "<=", String(through)).execute();
    await trx.updateTable("clients").set({ acked_seq: String(through) }).where("id", "=", clientId).execute();
    return { acked: through };
  });
}
