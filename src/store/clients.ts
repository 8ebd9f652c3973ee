/** Local clients of this homeserver. */
import type { Db } from "./db.ts";

/** Registers a client; true when it is new. Registering twice is harmless (the backend may retry). */
export async function registerClient(db: Db, clientId: string): Promise<boolean> {
  const result = await db.kysely
    .insertInto("clients").values({ id: clientId }).onConflict((oc) => oc.column("id").doNothing()).executeTakeFirst();
  return result.numInsertedOrUpdatedRows === 1n;
}

export async function clientExists(db: Db, clientId: string): Promise<boolean> {
  return (await db.kysely.selectFrom("clients").select("id").where("id", "=", clientId).executeTakeFirst()) !== undefined;
}
