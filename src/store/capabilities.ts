/** Capabilities and client blocks: written by the API, read by the commit transaction (src/receive/). */
import { sql } from "kysely";
import { capabilityHash, newCapabilitySecret } from "../policy/capabilities.ts";
import { uuidv7 } from "../protocol/event-id.ts";
import type { Db } from "./db.ts";

export interface CapabilityInfo {
  readonly id: string;
  readonly client: string;
  readonly group: string;
  readonly owner: string;
  readonly created_at: string;
  readonly revoked_at: string | null;
}

/** The secret is returned once and never stored. */
export async function issueCapability(db: Db, clientId: string, grp: string, owner: string): Promise<CapabilityInfo & { capability: string }> {
  const secret = newCapabilitySecret();
  const row = await db.kysely.insertInto("capabilities")
    .values({ id: uuidv7(), hash: capabilityHash(secret), client_id: clientId, grp, owner })
    .returning(["id", "created_at"]).executeTakeFirstOrThrow();
  return { id: row.id, client: clientId, group: grp, owner, created_at: row.created_at.toISOString(), revoked_at: null, capability: secret };
}

export async function listCapabilities(db: Db, clientId: string): Promise<CapabilityInfo[]> {
  const rows = await db.kysely.selectFrom("capabilities").select(["id", "client_id", "grp", "owner", "created_at", "revoked_at"])
    .where("client_id", "=", clientId).orderBy("created_at").orderBy("id").execute();
  return rows.map((r) => ({
    id: r.id, client: r.client_id, group: r.grp, owner: r.owner,
    created_at: r.created_at.toISOString(), revoked_at: r.revoked_at?.toISOString() ?? null,
  }));
}

/** Revokes one of `clientId`'s capabilities (any client's when undefined: operators). False if there is none. */
export async function revokeCapability(db: Db, id: string, clientId?: string): Promise<boolean> {
  let q = db.kysely.updateTable("capabilities").set({ revoked_at: sql<Date>`coalesce(revoked_at, now())` }).where("id", "=", id);
  if (clientId !== undefined) q = q.where("client_id", "=", clientId);
  const result = await q.executeTakeFirst();
  return result.numUpdatedRows > 0n;
}

export type BlockKind = "server" | "group";

export async function putBlock(db: Db, clientId: string, kind: BlockKind, target: string): Promise<boolean> {
  const r = await db.kysely.insertInto("client_blocks").values({ client_id: clientId, kind, target })
    .onConflict((oc) => oc.columns(["client_id", "kind", "target"]).doNothing()).executeTakeFirst();
  return r.numInsertedOrUpdatedRows === 1n;
}

export async function deleteBlock(db: Db, clientId: string, kind: BlockKind, target: string): Promise<boolean> {
  const r = await db.kysely.deleteFrom("client_blocks").where("client_id", "=", clientId).where("kind", "=", kind)
    .where("target", "=", target).executeTakeFirst();
  return r.numDeletedRows > 0n;
}

export async function listBlocks(db: Db, clientId: string): Promise<{ servers: string[]; groups: string[] }> {
  const rows = await db.kysely.selectFrom("client_blocks").select(["kind", "target"]).where("client_id", "=", clientId)
    .orderBy("kind").orderBy("target").execute();
  return {
    servers: rows.filter((r) => r.kind === "server").map((r) => r.target),
    groups: rows.filter((r) => r.kind === "group").map((r) => r.target),
  };
}
