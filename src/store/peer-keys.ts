/**
 * Key history (migrations/013): every key a kid was ever bound to, before it is
 * used, so every process and every restart of a homeserver agree on which key a
 * kid names. Rows are never deleted: a stored event names its key by thumbprint.
 */
import { sql } from "kysely";
import { RelayError } from "../errors.ts";
import type { VerificationKey } from "../protocol/keys.ts";
import { textArray } from "./arrays.ts";
import type { Db } from "./db.ts";

export interface BoundKey {
  readonly kid: string;
  readonly thumbprint: string;
  readonly jwk: unknown;
  /** When we learned the key is retired, in seconds: `retired_at`, else, for a key that had an `exp` when first seen, `first_seen`. */
  readonly retiredAt: number | null;
}

const selectBound = (db: Db) => db.kysely.selectFrom("peer_keys")
  .select(["kid", "thumbprint", "jwk", sql<number | null>`extract(epoch FROM coalesce(retired_at, CASE WHEN jwk ? 'exp' THEN first_seen END))::float8`.as("retiredAt")])
  .where("rebound", "=", false);

/** The keys the kids of `homeservers` are bound to. */
export async function boundKeys(db: Db, homeservers: readonly string[]): Promise<BoundKey[]> {
  if (homeservers.length === 0) return [];
  return selectBound(db).where("homeserver", "in", [...homeservers]).orderBy("kid").execute();
}

/**
 * Binds each of `keys` to its kid, unless the kid is bound already (by another
 * process, or before a restart), and marks `seen` (thumbprints) as seen now.
 * Returns what each of the kids of `keys` is bound to afterwards: a key whose
 * kid is bound to another must not be used.
 */
export async function bindKeys(db: Db, keys: readonly VerificationKey[], seen: readonly string[]): Promise<Map<string, BoundKey>> {
  const bound = new Map<string, BoundKey>();
  if (keys.length > 0) {
    await sql`
      INSERT INTO peer_keys (thumbprint, kid, homeserver, jwk, last_seen, retired_at)
      SELECT *, now(), CASE WHEN jwk ? 'exp' THEN now() END FROM unnest(${textArray(keys.map((k) => k.thumbprint))}::text[], ${textArray(keys.map((k) => k.kid))}::text[],
                                  ${textArray(keys.map((k) => k.homeserver))}::text[], ${textArray(keys.map((k) => JSON.stringify(k.jwk)))}::jsonb[])
      AS v(thumbprint, kid, homeserver, jwk)
      ON CONFLICT DO NOTHING`.execute(db.kysely);
    const rows = await selectBound(db).where("kid", "in", keys.map((k) => k.kid)).execute();
    for (const r of rows) bound.set(r.kid, r);
  }
  if (seen.length > 0) {
    await db.kysely.updateTable("peer_keys").set({ last_seen: sql<Date>`now()` }).where("thumbprint", "in", [...seen]).execute();
  }
  return bound;
}

/** Keys their peer retired (an `exp` they lacked, or an earlier one): the JWK as now held; `retired_at` is when we first learned it. */
export async function retireKeys(db: Db, keys: readonly VerificationKey[]): Promise<void> {
  for (const key of keys) {
    await db.kysely.updateTable("peer_keys")
      .set({ jwk: JSON.stringify(key.jwk), retired_at: sql<Date>`coalesce(retired_at, now())` })
      .where("thumbprint", "=", key.thumbprint).execute();
  }
}

/** Revoked peer keys, by kid: when, in seconds. */
export async function revokedKeys(db: Db): Promise<Map<string, number>> {
  const rows = await db.kysely.selectFrom("peer_keys").select(["kid", sql<number>`extract(epoch FROM revoked_at)::float8`.as("at")])
    .where("revoked_at", "is not", null).where("rebound", "=", false).execute();
  return new Map(rows.map((r) => [r.kid, r.at]));
}

/**
 * Revokes a peer's key (a compromised one): every process refuses it within a
 * second, and the stored events it verified are marked by it (their evidence
 * shows the revocation). Revoking twice keeps the first time.
 */
export async function revokePeerKey(db: Db, kid: string): Promise<{ kid: string; thumbprint: string; revokedAt: Date; storedEvents: number }> {
  const row = await db.kysely.updateTable("peer_keys").set({ revoked_at: sql<Date>`coalesce(revoked_at, now())` })
    .where("kid", "=", kid).where("rebound", "=", false).returning(["kid", "thumbprint", "revoked_at"]).executeTakeFirst();
  if (!row) throw new RelayError("not_found", `no peer key ${kid} in the key history`);
  const { n } = await db.kysely.selectFrom("events").select((eb) => eb.fn.countAll<string>().as("n")).where("key_thumbprint", "=", row.thumbprint).executeTakeFirstOrThrow();
  return { kid: row.kid, thumbprint: row.thumbprint, revokedAt: row.revoked_at!, storedEvents: Number(n) };
}

/** Retired keys (their `exp`, and when this homeserver first learned it), by kid. */
export async function retiredKeys(db: Db): Promise<Map<string, { exp: number; retiredAt: number }>> {
  const rows = await db.kysely.selectFrom("peer_keys")
    .select(["kid", sql<number>`(jwk->>'exp')::float8`.as("exp"), sql<number>`extract(epoch FROM retired_at)::float8`.as("retiredAt")])
    .where("retired_at", "is not", null).where("rebound", "=", false).where(sql<boolean>`jwk ? 'exp'`).execute();
  return new Map(rows.map((r) => [r.kid, { exp: r.exp, retiredAt: r.retiredAt }]));
}
