/**
 * Signing and verification keys (Ed25519 JWKs with kid `<homeserver>#<key-id>`).
 * A JWK may carry `nbf` and `exp` (seconds): the window in which it may sign. Keys
 * are never deleted, only retired with an `exp`, so old events stay provable.
 */
import { createPrivateKey, createPublicKey, type KeyObject } from "node:crypto";
import { calculateJwkThumbprint, exportJWK, generateKeyPair, type JWK } from "jose";
import sodium from "sodium-native";
import { RelayError } from "../errors.ts";
import { isHomeserverName, isKeyId, splitKid } from "./names.ts";

export interface PublicJwk extends JWK {
  readonly kty: "OKP";
  readonly crv: "Ed25519";
  readonly x: string;
  readonly kid: string;
  readonly nbf?: number;
  readonly exp?: number;
}

export interface PrivateJwk extends PublicJwk {
  readonly d: string;
}

/** A peer's key, ready for the hot path: libsodium verifies with `raw`, jose with `publicKey`. */
export interface VerificationKey {
  readonly kid: string;
  readonly homeserver: string;
  readonly publicKey: KeyObject;
  /** The 32-byte Ed25519 public key, as node:crypto validated it. */
  readonly raw: Buffer;
  readonly jwk: PublicJwk;
  /** RFC 7638 thumbprint: how a stored event names the key that verified it. */
  readonly thumbprint: string;
  readonly validFrom: number | undefined;
  readonly validUntil: number | undefined;
}

export interface SigningKey {
  readonly kid: string;
  readonly homeserver: string;
  readonly privateKey: KeyObject;
  /** libsodium's form of it (seed and public key, 64 bytes): what signs on the hot path (src/protocol/sign.ts). */
  readonly secretKey: Buffer;
  readonly publicJwk: PublicJwk;
}

export function isValidAt(key: VerificationKey, seconds: number): boolean {
  return (key.validFrom === undefined || seconds >= key.validFrom) &&
    (key.validUntil === undefined || seconds < key.validUntil);
}

function checkKid(kid: unknown): { homeserver: string; keyId: string } {
  if (typeof kid !== "string") throw new RelayError("bad_request", "JWK has no kid");
  const parts = splitKid(kid);
  if (!parts) throw new RelayError("bad_request", `JWK kid "${kid}" is not <homeserver>#<key-id>`);
  return parts;
}

function publicPart(jwk: PublicJwk): PublicJwk {
  const { kty, crv, x, kid, nbf, exp } = jwk;
  return { kty, crv, x, kid, ...(nbf === undefined ? {} : { nbf }), ...(exp === undefined ? {} : { exp }) };
}

function checkEd25519(jwk: unknown): asserts jwk is PublicJwk {
  const k = jwk as Partial<PublicJwk> | null;
  if (!k || typeof k !== "object" || k.kty !== "OKP" || k.crv !== "Ed25519" || typeof k.x !== "string") {
    throw new RelayError("bad_request", "only Ed25519 (OKP) JWKs are accepted");
  }
  for (const field of ["nbf", "exp"] as const) {
    if (k[field] !== undefined && !Number.isInteger(k[field])) {
      throw new RelayError("bad_request", `JWK ${field} must be whole seconds`);
    }
  }
}

export async function importVerificationKey(jwk: unknown): Promise<VerificationKey> {
  checkEd25519(jwk);
  const { homeserver } = checkKid(jwk.kid);
  const pub = publicPart(jwk);
  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey({ key: { kty: pub.kty, crv: pub.crv, x: pub.x }, format: "jwk" });
  } catch (cause) {
    throw new RelayError("bad_request", `JWK ${pub.kid} is not a valid Ed25519 public key`, { cause });
  }
  return Object.freeze({
    kid: pub.kid,
    homeserver,
    publicKey,
    raw: Buffer.from(publicKey.export({ format: "jwk" }).x!, "base64url"),
    jwk: pub,
    thumbprint: await calculateJwkThumbprint({ kty: pub.kty, crv: pub.crv, x: pub.x }),
    validFrom: pub.nbf,
    validUntil: pub.exp,
  });
}

export function importSigningKey(jwk: unknown): SigningKey {
  checkEd25519(jwk);
  const { homeserver } = checkKid(jwk.kid);
  const d = (jwk as Partial<PrivateJwk>).d;
  if (typeof d !== "string") throw new RelayError("bad_request", `JWK ${jwk.kid} has no private part (d)`);
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: { kty: "OKP", crv: "Ed25519", x: jwk.x, d }, format: "jwk" });
  } catch (cause) {
    throw new RelayError("bad_request", `JWK ${jwk.kid} is not a valid Ed25519 private key`, { cause });
  }
  // libsodium signs with the seed's own public key: an `x` that is not it would sign what nobody can verify.
  const seed = Buffer.from(d, "base64url");
  if (seed.length !== sodium.crypto_sign_SEEDBYTES) throw new RelayError("bad_request", `JWK ${jwk.kid}: d is not a 32-byte Ed25519 seed`);
  const publicKey = Buffer.alloc(sodium.crypto_sign_PUBLICKEYBYTES);
  const secretKey = Buffer.alloc(sodium.crypto_sign_SECRETKEYBYTES);
  sodium.crypto_sign_seed_keypair(publicKey, secretKey, seed);
  if (!publicKey.equals(Buffer.from(jwk.x, "base64url"))) throw new RelayError("bad_request", `JWK ${jwk.kid}: x is not the public key of d`);
  return Object.freeze({ kid: jwk.kid, homeserver, privateKey, secretKey, publicJwk: publicPart(jwk) });
}

export async function generateSigningJwk(
  homeserver: string,
  keyId: string,
  validFrom: number,
): Promise<PrivateJwk> {
  if (!isHomeserverName(homeserver)) throw new RelayError("bad_request", `"${homeserver}" is not a homeserver name`);
  if (!isKeyId(keyId)) throw new RelayError("bad_request", `"${keyId}" is not a key id ([A-Za-z0-9._-], 1–64)`);
  const { privateKey } = await generateKeyPair("EdDSA", { crv: "Ed25519", extractable: true });
  const jwk = await exportJWK(privateKey);
  return { kty: "OKP", crv: "Ed25519", x: jwk.x!, d: jwk.d!, kid: `${homeserver}#${keyId}`, nbf: validFrom };
}
