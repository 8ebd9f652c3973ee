/**
 * The secrets client bearer tokens are signed with (migration 009), and the one
 * query that says whether a token still counts. Secrets never leave this
 * homeserver; the key ids are not secret.
 */
import { randomBytes } from "node:crypto";
import { sql, type Kysely } from "kysely";
import type { Db } from "./db.ts";
import type { Database } from "./schema.ts";

export interface TokenKey {
  readonly id: string;
  readonly secret: Buffer;
}

export interface TokenKeyInfo {
  readonly id: string;
  readonly createdAt: Date;
  readonly retiredAt: Date | null;
  readonly revokedAt: Date | null;
  /** The key new tokens are signed with. */
  readonly signing: boolean;
}

/** `20261203-` and 8 random base64url characters: sortable by day, never reused. */
function newKeyId(now: Date): string {
  return `${now.toISOString().slice(0, 10).replaceAll("-", "")}-${randomBytes(6).toString("base64url")}`;
}

async function newestSigningKey(db: Kysely<Database>): Promise<TokenKey | undefined> {
  return db.selectFrom("client_token_keys").select(["id", "secret"])
    .where("retired_at", "is", null).where("revoked_at", "is", null)
    .orderBy("created_at", "desc").orderBy("id", "desc").limit(1).executeTakeFirst();
}

/** Serializes key changes of one homeserver (schemas share a database), so two processes never both create a first key. */
async function lockKeys(trx: Kysely<Database>): Promise<void> {
  await sql`SELECT pg_advisory_xact_lock(hashtext('fedrelay.client_token_keys.' || current_schema()))`.execute(trx);
}

async function insertKey(trx: Kysely<Database>): Promise<TokenKey> {
  const key = { id: newKeyId(new Date()), secret: randomBytes(32) };
  await trx.insertInto("client_token_keys").values(key).execute();
  return key;
}

/** The key that signs new tokens; the first call on a new homeserver (or after every key was revoked) creates one. */
export async function signingTokenKey(db: Db): Promise<TokenKey> {
  return (await newestSigningKey(db.kysely)) ?? db.kysely.transaction().execute(async (trx) => {
    await lockKeys(trx);
    return (await newestSigningKey(trx)) ?? insertKey(trx);
  });
}

/** Every key's secret, revoked ones included (a revoked key's tokens are refused by `tokenStillHolds`). */
export async function loadTokenKeys(db: Db): Promise<TokenKey[]> {
  return db.kysely.selectFrom("client_token_keys").select(["id", "secret"]).execute();
}

/** A new signing key; the keys that signed until now are retired (their tokens stay valid until they expire). */
export async function rotateTokenKeys(db: Db): Promise<{ id: string; retired: string[] }> {
  return db.kysely.transaction().execute(async (trx) => {
    await lockKeys(trx);
    const retired = await trx.updateTable("client_token_keys").set({ retired_at: sql`now()` })
      .where("retired_at", "is", null).where("revoked_at", "is", null).returning("id").execute();
    const { id } = await insertKey(trx);
    return { id, retired: retired.map((r) => r.id).sort() };
  });
}

/** Refuses every token signed with `id` from now on; false if there is no such key or it was revoked already. */
export async function revokeTokenKey(db: Db, id: string): Promise<boolean> {
  const result = await db.kysely.updateTable("client_token_keys")
    .set({ revoked_at: sql`now()`, retired_at: sql`coalesce(retired_at, now())` })
    .where("id", "=", id).where("revoked_at", "is", null).executeTakeFirst();
  return result.numUpdatedRows > 0n;
}

export async function listTokenKeys(db: Db): Promise<TokenKeyInfo[]> {
  const rows = await db.kysely.selectFrom("client_token_keys").select(["id", "created_at", "retired_at", "revoked_at"])
    .orderBy("created_at").orderBy("id").execute();
  const signing = rows.findLast((r) => r.retired_at === null && r.revoked_at === null)?.id;
  return rows.map((r) => ({ id: r.id, createdAt: r.created_at, retiredAt: r.retired_at, revokedAt: r.revoked_at, signing: r.id === signing }));
}

export interface TokenBinding {
  readonly clientId: string;
  /** The client's registration the token was issued for (a UUID). */
  readonly registration: string;
  readonly keyId: string;
  /** The token's `iat`, seconds. */
  readonly issuedAt: number;
}

/**
 * Whether a token whose signature verified still counts: its client exists with
 * the same registration, and its key is not revoked and was not yet retired when
 * it was issued. One round trip, read fresh every request, so a removal, a
 * revocation or a retirement applies to every process at once.
 */
export async function tokenStillHolds(db: Db, binding: TokenBinding): Promise<boolean> {
  const row = await db.kysely.selectFrom("clients").innerJoin("client_token_keys as k", (join) => join.on("k.id", "=", binding.keyId))
    .select(sql<number>`1`.as("ok"))
    .where("clients.id", "=", binding.clientId)
    .where("clients.registration", "=", binding.registration)
    .where("k.revoked_at", "is", null)
    .where((eb) => eb.or([eb("k.retired_at", "is", null), eb("k.retired_at", ">", sql<Date>`to_timestamp(${binding.issuedAt})`)]))
    .executeTakeFirst();
  return row !== undefined;
}
