/**
 * This homeserver's own signing keys over time (migrations/014), as a function
 * of the rows and the time: which key signs now, and the key set peers are
 * served. Pure; src/keys/own-key-watch.ts keeps every process's view current.
 */
import type { PrivateJwk, PublicJwk } from "../protocol/keys.ts";

export interface OwnKeyRow {
  readonly kid: string;
  readonly privateJwk: PrivateJwk;
  /** Seconds since the epoch. */
  readonly signFrom: number;
  readonly retiredAt: number | null;
}

export interface OwnKeySet {
  /** The key that signs at this time: the latest whose sign_from has passed. */
  readonly signing: OwnKeyRow | undefined;
  /** Every key, current, coming and retired, public parts only, a retired one with its `exp`. */
  readonly served: readonly PublicJwk[];
}

/** A key's public part as served: its own `nbf` (fixed when it was made) and, once retired, `exp`. */
export function servedJwk(row: OwnKeyRow): PublicJwk {
  const { kty, crv, x, kid, nbf } = row.privateJwk;
  const exp = row.retiredAt ?? row.privateJwk.exp;
  return { kty, crv, x, kid, ...(nbf === undefined ? {} : { nbf }), ...(exp === undefined ? {} : { exp: Math.floor(exp) }) };
}

export function ownKeySet(rows: readonly OwnKeyRow[], now: number): OwnKeySet {
  let signing: OwnKeyRow | undefined;
  for (const row of rows) {
    // A key retired before it was to sign never signs (nor would peers accept it: its exp is not after its nbf).
    if (row.retiredAt !== null && row.retiredAt <= row.signFrom) continue;
    if (row.signFrom <= now && (signing === undefined || row.signFrom > signing.signFrom || (row.signFrom === signing.signFrom && row.kid > signing.kid))) signing = row;
  }
  return { signing, served: [...rows].sort((a, b) => a.signFrom - b.signFrom || a.kid.localeCompare(b.kid)).map(servedJwk) };
}
