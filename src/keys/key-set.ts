/**
 * What a peer's key set changes, as a function of data: the set as fetched
 * (or configured), the keys already known for the peer, and the limits. Each
 * key is judged on its own, so one key the relay refuses never costs the others
 * (docs/protocol.md §10, Keys). Pure.
 */
import { checkPeerJwk, type KeyRefusal, type PeerJwkCheck } from "../protocol/keys.ts";
import { parseStrictObject } from "../protocol/strict-json.ts";

/** Why a key of a set is not taken: the key's own faults, or what it would do to the set. */
export type KeySetRefusal =
  | KeyRefusal
  /** Its kid names another homeserver: a peer's set never speaks for anyone else. */
  | "other_homeserver"
  /** The set lists its kid twice with different keys: which one the peer meant is unknowable. */
  | "duplicate_kid"
  /** Its kid is already bound to a different key: a kid, once seen, names one key forever. */
  | "rebound_kid"
  /** Its key is already bound to another kid (of this peer or another's): a key is named by one kid. */
  | "reused_key"
  /** A known key served with a wider window (its `exp` later or gone, its `nbf` changed): a retirement is never undone. */
  | "validity_widened";

export interface RefusedKey {
  readonly kid: string | undefined;
  readonly reason: KeySetRefusal;
  readonly detail: string;
}

export type CheckedKey = Extract<PeerJwkCheck, { ok: true }>;

export interface KeySetPlan {
  /** Keys new to the peer, each checked. */
  readonly add: readonly CheckedKey[];
  readonly refused: readonly RefusedKey[];
  /** Thumbprints of known keys the set serves again: last seen now. */
  readonly seen: readonly string[];
  /** Known keys the set retires (an `exp` where they had none, or an earlier one): their new `exp`. */
  readonly retire: readonly { readonly kid: string; readonly exp: number }[];
}

/** A key already bound to its kid, and the window it is held with. */
export interface KnownKey {
  readonly thumbprint: string;
  readonly nbf: number | undefined;
  readonly exp: number | undefined;
}

export interface KeySetLimits {
  /** A key set's body, in bytes. */
  readonly maxBytes: number;
  /** Keys in one set. */
  readonly maxKeys: number;
}

/**
 * Decades of yearly (or years of monthly) rotations, every retired key still
 * served: 1,000 keys of ~130 bytes. A set past either limit is refused whole,
 * so 100,000 keys (measured: 24–28 CPU-seconds and ~155 MB a fetch before the
 * limits) cost a bounded read and nothing more.
 */
export const DEFAULT_KEY_SET_LIMITS: KeySetLimits = { maxBytes: 256 * 1024, maxKeys: 1000 };

export type ParsedKeySet = { readonly ok: true; readonly keys: readonly unknown[] } | { readonly ok: false; readonly detail: string };

/** `{"keys": [...]}` read as strictly as an event (no member named twice), within the limits. */
export function parseKeySet(text: string, limits: KeySetLimits): ParsedKeySet {
  if (Buffer.byteLength(text) > limits.maxBytes) return { ok: false, detail: `the key set is over ${limits.maxBytes} bytes` };
  const body = parseStrictObject(text);
  if (!body) return { ok: false, detail: "the key set is not a JSON object naming each member once" };
  if (!Array.isArray(body.keys)) return { ok: false, detail: "the key set has no keys array" };
  if (body.keys.length > limits.maxKeys) return { ok: false, detail: `the key set lists ${body.keys.length} keys, over ${limits.maxKeys}` };
  return { ok: true, keys: body.keys };
}

/**
 * What `jwks`, served by (or configured for) `homeserver`, changes in `known`
 * (the keys already bound, by kid). A known kid served with the same key and
 * window is neither added nor refused; served with an `exp` it lacked, or an
 * earlier one, it is retired; any other change of its window is refused.
 */
export function planKeySet(homeserver: string, jwks: readonly unknown[], known: ReadonlyMap<string, KnownKey>): KeySetPlan {
  const checked: CheckedKey[] = [];
  const refused: RefusedKey[] = [];
  // Every distinct key a kid is listed with in this set.
  const listed = new Map<string, Set<string>>();
  for (const jwk of jwks) {
    const c = checkPeerJwk(jwk);
    if (!c.ok) {
      refused.push({ kid: c.kid, reason: c.reason, detail: c.detail });
      continue;
    }
    if (c.homeserver !== homeserver) {
      refused.push({ kid: c.jwk.kid, reason: "other_homeserver", detail: `the key names ${c.homeserver}, not ${homeserver}` });
      continue;
    }
    checked.push(c);
    const thumbprints = listed.get(c.jwk.kid) ?? new Set<string>();
    thumbprints.add(c.thumbprint);
    listed.set(c.jwk.kid, thumbprints);
  }
  const add: CheckedKey[] = [];
  const retire: { kid: string; exp: number }[] = [];
  const again = new Set<string>();
  const seen = new Set<string>();
  for (const c of checked) {
    const kid = c.jwk.kid;
    const { thumbprint } = c;
    const bound = known.get(kid);
    if (bound !== undefined) {
      if (bound.thumbprint !== thumbprint) {
        refused.push({ kid, reason: "rebound_kid", detail: `${kid} is bound to key ${bound.thumbprint}; the set serves ${thumbprint} under it` });
        continue;
      }
      again.add(thumbprint);
      const { nbf, exp } = c.jwk;
      if (nbf !== bound.nbf || (bound.exp !== undefined && (exp === undefined || exp > bound.exp))) {
        const window = (from: number | undefined, until: number | undefined) => `[${from ?? "-"}, ${until ?? "-"})`;
        if (!refused.some((r) => r.kid === kid)) refused.push({ kid, reason: "validity_widened", detail: `${kid} is held valid for ${window(bound.nbf, bound.exp)}; the set serves ${window(nbf, exp)}` });
      } else if (exp !== undefined && exp !== bound.exp && !retire.some((r) => r.kid === kid)) {
        retire.push({ kid, exp });
      }
      continue;
    }
    if (listed.get(kid)!.size > 1) {
      if (!seen.has(kid)) refused.push({ kid, reason: "duplicate_kid", detail: `the set lists ${kid} with ${listed.get(kid)!.size} different keys` });
      seen.add(kid);
      continue;
    }
    if (seen.has(kid)) continue;
    seen.add(kid);
    add.push(c);
  }
  return { add, refused, seen: [...again], retire };
}
