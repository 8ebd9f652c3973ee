/** Who is calling: the homeserver backend (service token) or a client (bearer JWT minted by this homeserver). */
import { timingSafeEqual, createHash } from "node:crypto";
import { createLocalJWKSet, jwtVerify, SignJWT, type JSONWebKeySet } from "jose";
import { RelayError } from "../errors.ts";
import { CLIENT_TOKEN_TYP, EVENT_ALG } from "../protocol/claims.ts";
import type { SigningKey } from "../protocol/keys.ts";
import { isClientId } from "../protocol/names.ts";

export function bearerOf(header: string | undefined): string {
  const match = /^Bearer ([^\s]+)$/.exec(header ?? "");
  if (!match) throw new RelayError("unauthorized", "missing or malformed Authorization: Bearer header");
  return match[1]!;
}

/** Constant-time, and length-independent: both sides are hashed first. */
export function checkServiceToken(header: string | undefined, expected: string | undefined): void {
  if (expected === undefined) throw new RelayError("unauthorized", "no service token is configured (http.serviceToken)");
  const given = createHash("sha256").update(bearerOf(header)).digest();
  if (!timingSafeEqual(given, createHash("sha256").update(expected).digest())) {
    throw new RelayError("unauthorized", "invalid service token");
  }
}

export interface ClientTokens {
  mint(clientId: string): Promise<{ token: string; expiresAt: number }>;
  /** The client id, or `unauthorized`. */
  verify(header: string | undefined): Promise<string>;
}

export function createClientTokens(options: {
  self: string;
  signingKey: SigningKey;
  publicKeys: JSONWebKeySet;
  ttlSeconds: number;
  now: () => number;
}): ClientTokens {
  const keySet = createLocalJWKSet(options.publicKeys);
  return {
    async mint(clientId) {
      const iat = Math.floor(options.now());
      const expiresAt = iat + options.ttlSeconds;
      const token = await new SignJWT({})
        .setProtectedHeader({ alg: EVENT_ALG, kid: options.signingKey.kid, typ: CLIENT_TOKEN_TYP })
        .setIssuer(options.self).setAudience(options.self).setSubject(clientId)
        .setIssuedAt(iat).setExpirationTime(expiresAt)
        .sign(options.signingKey.privateKey);
      return { token, expiresAt };
    },
    async verify(header) {
      const token = bearerOf(header);
      try {
        const { payload } = await jwtVerify(token, keySet, {
          issuer: options.self,
          audience: options.self,
          typ: CLIENT_TOKEN_TYP,
          algorithms: [EVENT_ALG],
          currentDate: new Date(options.now() * 1000),
        });
        if (!isClientId(payload.sub)) throw new Error("sub is not a client id");
        return payload.sub;
      } catch (cause) {
        throw new RelayError("unauthorized", `invalid client token: ${(cause as Error).message}`, { cause });
      }
    },
  };
}
