/** Local clients of this homeserver. */
import { sql } from "kysely";
import type { Db } from "./db.ts";

/**
 * Registers a client; true when it is new. Registering twice is harmless (the
 * backend may retry). A new client that reuses a removed client's id does not
 * inherit its capabilities: they are revoked in the same transaction.
 */
export async function registerClient(db: Db, clientId: string): Promise<boolean> {
  return db.kysely.transaction().execute(async (trx) => {
    const result = await trx
      .insertInto("clients").values({ id: clientId }).onConflict((oc) => oc.column("id").doNothing()).executeTakeFirst();
    const created = result.numInsertedOrUpdatedRows === 1n;
    if (created) {
      await trx.updateTable("capabilities").set({ revoked_at: new Date() })
        .where("client_id", "=", clientId).where("revoked_at", "is", null).execute();
    }
    return created;
  });
}

/** Removes a client and its pending deliveries and blocks; events and capabilities stay for the record. */
export async function removeClient(db: Db, clientId: string): Promise<boolean> {
  return db.kysely.transaction().execute(async (trx) => {
    // The client row first: its lock makes a concurrent commit for this client wait, then see it gone.
    const result = await trx.deleteFrom("clients").where("id", "=", clientId).executeTakeFirst();
    await trx.deleteFrom("deliveries").where("client_id", "=", clientId).execute();
    return result.numDeletedRows > 0n;
  });
}

/** The client's current registration (every token of it carries this), or undefined if there is no such client. */
export async function clientRegistration(db: Db, clientId: string): Promise<string | undefined> {
  return (await db.kysely.selectFrom("clients").select("registration").where("id", "=", clientId).executeTakeFirst())?.registration;
}

/** Every token issued to the client so far stops working (a stolen device, a logout everywhere); its messages stay. */
export async function revokeClientTokens(db: Db, clientId: string): Promise<boolean> {
  const result = await db.kysely.updateTable("clients").set({ registration: sql`gen_random_uuid()` }).where("id", "=", clientId).executeTakeFirst();
  return result.numUpdatedRows > 0n;
}

export async function clientExists(db: Db, clientId: string): Promise<boolean> {
  return (await db.kysely.selectFrom("clients").select("id").where("id", "=", clientId).executeTakeFirst()) !== undefined;
}
