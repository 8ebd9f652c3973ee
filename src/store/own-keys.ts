/**
 * This homeserver's own signing keys (migrations/014): the configured key as the
 * first, and rotations. Changes are serialized per homeserver (an advisory lock),
 * so two rotations at once never leave two keys unretired.
 */
import { sql, type Kysely } from "kysely";
import type { OwnKeyRow } from "../keys/own-keys.ts";
import { RelayError } from "../errors.ts";
import { generateSigningJwk, type PrivateJwk } from "../protocol/keys.ts";
import type { Db } from "./db.ts";
import type { Database } from "./schema.ts";

const seconds = (d: Date): number => d.getTime() / 1000;

export async function ownKeyRows(db: Db): Promise<OwnKeyRow[]> {
  const rows = await db.kysely.selectFrom("own_keys").select(["kid", "private_jwk", "sign_from", "retired_at"]).orderBy("sign_from").execute();
  return rows.map((r) => ({ kid: r.kid, privateJwk: r.private_jwk as PrivateJwk, signFrom: seconds(r.sign_from), retiredAt: r.retired_at && seconds(r.retired_at) }));
}

async function lockOwnKeys(trx: Kysely<Database>): Promise<void> {
  await sql`SELECT pg_advisory_xact_lock(hashtext('fedrelay.own_keys.' || current_schema()))`.execute(trx);
}

/**
 * The configured key, made a row the first time it is seen: the first key, or
 * one an operator switched to by editing the configuration (then it signs from
 * now, and the keys before it are retired now). A kid already there with
 * another key is refused: a kid names one key forever.
 */
export async function adoptConfiguredKey(db: Db, jwk: PrivateJwk, now: number): Promise<void> {
  await db.kysely.transaction().execute(async (trx) => {
    await lockOwnKeys(trx);
    const existing = await trx.selectFrom("own_keys").select("private_jwk").where("kid", "=", jwk.kid).executeTakeFirst();
    if (existing) {
      if ((existing.private_jwk as PrivateJwk).x !== jwk.x) {
        throw new RelayError("config_invalid", `config key keys.signingKey: ${jwk.kid} is already another key of this homeserver's (own_keys); a kid names one key forever: make the new key with another --key-id`);
      }
      return;
    }
    const signFrom = new Date(now * 1000);
    // Only keys that have signed: a pending rotation's key still takes over at its sign_from.
    await trx.updateTable("own_keys").set({ retired_at: signFrom }).where("retired_at", "is", null).where("sign_from", "<=", signFrom).execute();
    await trx.insertInto("own_keys").values({ kid: jwk.kid, private_jwk: JSON.stringify(jwk), sign_from: signFrom }).execute();
  });
}

/** A new key, served at once and signing `overlapSeconds` from now; the keys signing until then are retired at that moment. */
export async function rotateOwnKey(db: Db, homeserver: string, overlapSeconds: number, now: number): Promise<{ kid: string; signFrom: Date; retired: string[] }> {
  const signFrom = Math.floor(now) + overlapSeconds;
  const keyId = `${new Date(now * 1000).toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-")}`;
  const jwk = await generateSigningJwk(homeserver, keyId, signFrom);
  return db.kysely.transaction().execute(async (trx) => {
    await lockOwnKeys(trx);
    if (await trx.selectFrom("own_keys").select("kid").where("kid", "=", jwk.kid).executeTakeFirst()) {
      throw new RelayError("conflict", `a key ${jwk.kid} was made this second already; rotate again in a second`);
    }
    const at = new Date(signFrom * 1000);
    const pending = await trx.selectFrom("own_keys").select(["kid", "sign_from"]).where("sign_from", ">=", at).executeTakeFirst();
    if (pending) {
      throw new RelayError("conflict", `${pending.kid} signs from ${pending.sign_from.toISOString()}, after this rotation's ${at.toISOString()}: give --overlap that ends after it`);
    }
    const retired = await trx.updateTable("own_keys").set({ retired_at: at }).where("retired_at", "is", null).returning("kid").execute();
    await trx.insertInto("own_keys").values({ kid: jwk.kid, private_jwk: JSON.stringify(jwk), sign_from: at }).execute();
    return { kid: jwk.kid, signFrom: at, retired: retired.map((r) => r.kid) };
  });
}
