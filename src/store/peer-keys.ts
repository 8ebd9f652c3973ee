/**
 * Key history (migrations/013): every key a kid was ever bound to, before it is
 * used, so every process and every restart of a homeserver agree on which key a
 * kid names. Rows are never deleted: a stored event names its key by thumbprint.
 */
import { sql } from "kysely";
import { RelayError } from "../errors.ts";
import type { KeyChanges, KeyStore } from "../keys/registry.ts";
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

/** Revoked keys (when) and retired ones (their `exp`, and when this homeserver first learned it), by kid: one query a second, in every process. */
export async function keyChanges(db: Db): Promise<KeyChanges> {
  const rows = await db.kysely.selectFrom("peer_keys")
    .select([
      "kid",
      sql<number | null>`extract(epoch FROM revoked_at)::float8`.as("revokedAt"),
      sql<number | null>`CASE WHEN jwk ? 'exp' THEN (jwk->>'exp')::float8 END`.as("exp"),
      sql<number | null>`extract(epoch FROM retired_at)::float8`.as("retiredAt"),
    ])
    .where((eb) => eb.or([eb("revoked_at", "is not", null), eb("retired_at", "is not", null)])).where("rebound", "=", false).execute();
  const revoked = new Map<string, number>();
  const retired = new Map<string, { exp: number; retiredAt: number }>();
  for (const r of rows) {
    if (r.revokedAt !== null) revoked.set(r.kid, r.revokedAt);
    if (r.exp !== null && r.retiredAt !== null) retired.set(r.kid, { exp: r.exp, retiredAt: r.retiredAt });
  }
  return { revoked, retired };
}

/** The key history as the key registry uses it. */
export function keyStoreOf(db: Db): KeyStore {
  return {
    bound: (homeservers) => boundKeys(db, homeservers),
    bind: (keys, seen) => bindKeys(db, keys, seen),
    retire: (keys) => retireKeys(db, keys),
    changes: () => keyChanges(db),
  };
}
