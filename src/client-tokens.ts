/**
 * Client bearer tokens (docs/protocol.md §10): HS256 JWTs, `typ`
 * `fedrelay-client+jwt`, under a secret of this homeserver's own
 * (src/store/client-token-keys.ts), never its federation signing key. A token
 * names its client's registration, lives at most http.clientTokenTtlSeconds, and
 * counts only while that registration and its key do: removing or registering a
 * client again, revoking its tokens, retiring or revoking a key all apply at once.
 *
 * HMAC rather than a signature: only this homeserver ever verifies these tokens.
 */
import { createSecretKey, type KeyObject } from "node:crypto";
import { decodeProtectedHeader, jwtVerify, SignJWT } from "jose";
import { RelayError } from "./errors.ts";
import { CLIENT_TOKEN_TYP } from "./protocol/claims.ts";
import { isClientId } from "./protocol/names.ts";
import { loadTokenKeys, signingTokenKey, tokenStillHolds } from "./store/client-token-keys.ts";
import { clientRegistration } from "./store/clients.ts";
import type { Db } from "./store/db.ts";

export const CLIENT_TOKEN_ALG = "HS256";
/** A token for a 255-character client id is about 600 characters; anything far longer is not one of ours. */
export const MAX_CLIENT_TOKEN_LENGTH = 2048;
/** The processes of one homeserver share its clock to well within this. */
const MAX_ISSUED_AHEAD_SECONDS = 60;
const KEY_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** header.payload.MAC, each canonical unpadded base64url; an HS256 MAC is 32 bytes, 43 characters ending in one of 16. */
const TOKEN_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$/;

export interface ClientTokens {
  /** A new token for a registered client (`not_found` otherwise). */
  mint(clientId: string): Promise<{ token: string; expiresAt: number }>;
  /** The client id the token was issued to, or `unauthorized`. */
  verify(token: string): Promise<string>;
}

export interface ClientTokenOptions {
  readonly self: string;
  readonly db: Db;
  /** The lifetime of a new token, and the longest any token may claim. */
  readonly ttlSeconds: number;
  /** Seconds since the epoch. */
  readonly now: () => number;
  /** Least time between two reloads of the key list for a kid not seen yet (default 1 s). */
  readonly reloadCooldownMs?: number;
}

function refused(message: string, cause?: unknown): RelayError {
  return new RelayError("unauthorized", `invalid client token: ${message}`, cause === undefined ? undefined : { cause });
}

/**
 * The secrets by key id. A kid not seen yet reloads the list, once for every
 * caller waiting and at most once per cooldown, so a flood of made-up kids
 * costs Postgres one query a cooldown, and a key made by another process
 * (a rotation) is found within one.
 */
function createKeyCache(db: Db, cooldownMs: number): { get(kid: string): Promise<KeyObject | undefined>; add(id: string, secret: Buffer): KeyObject } {
  const keys = new Map<string, KeyObject>();
  let loading: Promise<void> | undefined;
  let lastLoad = -Infinity;
  const add = (id: string, secret: Buffer): KeyObject => {
    let key = keys.get(id);
    if (!key) keys.set(id, (key = createSecretKey(secret)));
    return key;
  };
  const reload = async (): Promise<void> => {
    const wait = lastLoad + cooldownMs - Date.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    lastLoad = Date.now();
    try {
      for (const k of await loadTokenKeys(db)) add(k.id, k.secret);
    } catch (cause) {
      throw new RelayError("unavailable", "cannot read client token keys", { cause });
    }
  };
  return {
    add,
    async get(kid) {
      if (!keys.has(kid)) await (loading ??= reload().finally(() => (loading = undefined)));
      return keys.get(kid);
    },
  };
}

export function createClientTokens(options: ClientTokenOptions): ClientTokens {
  const { self, db, ttlSeconds, now } = options;
  const keys = createKeyCache(db, options.reloadCooldownMs ?? 1000);
  return {
    async mint(clientId) {
      const registration = await clientRegistration(db, clientId);
      if (registration === undefined) throw new RelayError("not_found", `no client ${clientId}`);
      const key = await signingTokenKey(db);
      const iat = Math.floor(now());
      const expiresAt = iat + ttlSeconds;
      const token = await new SignJWT({ reg: registration })
        .setProtectedHeader({ alg: CLIENT_TOKEN_ALG, kid: key.id, typ: CLIENT_TOKEN_TYP })
        .setIssuer(self).setAudience(self).setSubject(clientId)
        .setIssuedAt(iat).setExpirationTime(expiresAt)
        .sign(keys.add(key.id, key.secret));
      return { token, expiresAt };
    },

    async verify(token) {
      if (token.length > MAX_CLIENT_TOKEN_LENGTH) throw refused("too long");
      // One spelling per token: jose would also take padded or otherwise re-encoded parts.
      if (!TOKEN_SHAPE.test(token)) throw refused("not three unpadded base64url parts with a 256-bit MAC");
      let kid: string;
      try {
        const header = decodeProtectedHeader(token);
        if (header.alg !== CLIENT_TOKEN_ALG || header.typ !== CLIENT_TOKEN_TYP) throw new Error(`not a ${CLIENT_TOKEN_TYP} under ${CLIENT_TOKEN_ALG}`);
        if (typeof header.kid !== "string" || !KEY_ID_RE.test(header.kid)) throw new Error("kid is not a key id");
        kid = header.kid;
      } catch (cause) {
        throw refused((cause as Error).message, cause);
      }
      const key = await keys.get(kid);
      if (!key) throw refused(`unknown key ${kid}`);
      const at = now();
      let payload;
      try {
        ({ payload } = await jwtVerify(token, key, {
          algorithms: [CLIENT_TOKEN_ALG], typ: CLIENT_TOKEN_TYP, issuer: self, audience: self,
          requiredClaims: ["sub", "iat", "exp", "reg"], currentDate: new Date(at * 1000),
        }));
      } catch (cause) {
        throw refused((cause as Error).message, cause);
      }
      const { sub, reg, iat, exp } = payload;
      if (!isClientId(sub)) throw refused("sub is not a client id");
      if (typeof reg !== "string" || !UUID_RE.test(reg)) throw refused("reg is not a registration");
      if (!Number.isInteger(iat) || !Number.isInteger(exp)) throw refused("iat and exp must be whole seconds");
      // A token is only ever minted for ttlSeconds: a longer one, or one from the future, was not minted here.
      if (exp! - iat! > ttlSeconds) throw refused(`lifetime ${exp! - iat!} s exceeds ${ttlSeconds} s`);
      if (iat! > at + MAX_ISSUED_AHEAD_SECONDS) throw refused("issued in the future");
      if (!(await tokenStillHolds(db, { clientId: sub, registration: reg, keyId: kid, issuedAt: iat! }))) {
        throw refused("revoked (the client was removed or registered again, its tokens were revoked, or the key was retired before the token was issued)");
      }
      return sub;
    },
  };
}
