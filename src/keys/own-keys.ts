/**
 * This homeserver's own signing keys over time (migrations/014), as functions
 * of the rows: which key signs at a given time, and the key set peers are served
 * (the same at any time). Pure; src/keys/own-key-watch.ts keeps every process's
 * view current.
 */
import type { PrivateJwk, PublicJwk } from "../protocol/keys.ts";

export interface OwnKeyRow {
  readonly kid: string;
  readonly privateJwk: PrivateJwk;
  /** Seconds since the epoch. */
  readonly signFrom: number;
  readonly retiredAt: number | null;
}

/** A key's public part as served: its own `nbf` (fixed when it was made) and, once retired, `exp`. */
function servedJwk(row: OwnKeyRow): PublicJwk {
  const { kty, crv, x, kid, nbf } = row.privateJwk;
  const exp = row.retiredAt ?? row.privateJwk.exp;
  return { kty, crv, x, kid, ...(nbf === undefined ? {} : { nbf }), ...(exp === undefined ? {} : { exp: Math.floor(exp) }) };
}

/** The key that signs at `now`: the latest whose sign_from has passed. */
export function signingKeyAt(rows: readonly OwnKeyRow[], now: number): OwnKeyRow | undefined {
  let signing: OwnKeyRow | undefined;
  for (const row of rows) {
    // A key retired before it was to sign never signs (nor would peers accept it: its exp is not after its nbf).
    if (row.retiredAt !== null && row.retiredAt <= row.signFrom) continue;
    if (row.signFrom <= now && (signing === undefined || row.signFrom > signing.signFrom || (row.signFrom === signing.signFrom && row.kid > signing.kid))) signing = row;
  }
  return signing;
}

/** What peers are served, whatever the time: every key, current, coming and retired, public parts only, a retired one with its `exp`. */
export function servedJwks(rows: readonly OwnKeyRow[]): PublicJwk[] {
  return [...rows].sort((a, b) => a.signFrom - b.signFrom || a.kid.localeCompare(b.kid)).map(servedJwk);
}
