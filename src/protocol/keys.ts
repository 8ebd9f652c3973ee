/**
 * Signing and verification keys (Ed25519 JWKs with kid `<homeserver>#<key-id>`).
 * A JWK may carry `nbf` and `exp` (seconds): the window in which it may sign. Keys
 * are never deleted, only retired with an `exp`, so old events stay provable.
 */
import { createHash, createPrivateKey, createPublicKey, type KeyObject } from "node:crypto";
import { exportJWK, generateKeyPair, type JWK } from "jose";
import sodium from "sodium-native";
import { RelayError } from "../errors.ts";
import { decodeBase64url } from "./base64url.ts";
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

/** Why a peer's JWK is not taken (logged and counted by peer and reason; docs/protocol.md §10, Keys). */
export const KEY_REFUSALS = [
  "not_an_object",
  "not_ed25519",
  "bad_kid",
  "private_member",
  "unknown_member",
  "bad_use",
  "bad_alg",
  "bad_key_ops",
  "bad_validity",
  "bad_x",
  "weak_key",
] as const;
export type KeyRefusal = (typeof KEY_REFUSALS)[number];

export type PeerJwkCheck =
  | { readonly ok: true; readonly jwk: PublicJwk; readonly raw: Buffer; readonly homeserver: string; readonly thumbprint: string }
  | { readonly ok: false; readonly reason: KeyRefusal; readonly detail: string; readonly kid?: string };

/** Members a public Ed25519 JWK may carry; any other is refused, so a key means one thing to every reader. */
const PUBLIC_MEMBERS: ReadonlySet<string> = new Set(["kty", "crv", "x", "kid", "nbf", "exp", "use", "alg", "key_ops", "ext"]);
/** RFC 8037's private member of an OKP key, and the RSA/EC ones, which no public key carries. */
const PRIVATE_MEMBERS: ReadonlySet<string> = new Set(["d", "p", "q", "dp", "dq", "qi", "oth", "k"]);
/** Whole seconds a JWK's `nbf`/`exp` may name: from the epoch to the year 10000. */
const MAX_SECONDS = 253_402_300_800;

/**
 * Whether `jwk` is a public Ed25519 key this protocol takes from a peer, and its
 * 32 bytes if so. Pure. Beyond the shape, the point itself is checked with
 * libsodium's crypto_core_ed25519_is_valid_point: canonical encoding (y < p),
 * on the curve, in the prime-order subgroup, not of small order. Some verifiers
 * accept a signature forged without any private key under a small-order key
 * (node:crypto on OpenSSL 3.0 did, for the reports and client tokens it checks),
 * so a weak key is never taken, whatever verifier the Node build carries. And
 * with `x` canonical twice over (its base64url and its point), a key has exactly
 * one RFC 7638 thumbprint.
 */
export function checkPeerJwk(jwk: unknown): PeerJwkCheck {
  if (jwk === null || typeof jwk !== "object" || Array.isArray(jwk)) return { ok: false, reason: "not_an_object", detail: "a key is not a JSON object" };
  const k = jwk as Record<string, unknown>;
  const kid = typeof k.kid === "string" ? k.kid : undefined;
  const refuse = (reason: KeyRefusal, detail: string): PeerJwkCheck => (kid === undefined ? { ok: false, reason, detail } : { ok: false, reason, detail, kid });
  const parts = kid === undefined ? undefined : splitKid(kid);
  if (!parts) return refuse("bad_kid", "kid is not <homeserver>#<key-id> (key-id 1–64 of [A-Za-z0-9._-])");
  for (const name of Object.keys(k)) {
    if (PRIVATE_MEMBERS.has(name)) return refuse("private_member", `a public key set carries the private member ${JSON.stringify(name)}`);
  }
  if (k.kty !== "OKP" || k.crv !== "Ed25519") return refuse("not_ed25519", "not an Ed25519 key (kty OKP, crv Ed25519)");
  for (const name of Object.keys(k)) {
    if (!PUBLIC_MEMBERS.has(name)) return refuse("unknown_member", `member ${JSON.stringify(name.slice(0, 32))} is not one of ${[...PUBLIC_MEMBERS].join(", ")}`);
  }
  if (k.use !== undefined && k.use !== "sig") return refuse("bad_use", "use is not sig");
  if (k.alg !== undefined && k.alg !== "EdDSA") return refuse("bad_alg", "alg is not EdDSA");
  if (k.key_ops !== undefined && !(Array.isArray(k.key_ops) && k.key_ops.length > 0 && k.key_ops.every((op) => op === "verify"))) {
    return refuse("bad_key_ops", "key_ops is not [\"verify\"]");
  }
  if (k.ext !== undefined && typeof k.ext !== "boolean") return refuse("unknown_member", "ext is not a boolean");
  for (const field of ["nbf", "exp"] as const) {
    const v = k[field];
    if (v !== undefined && !(Number.isSafeInteger(v) && (v as number) >= 0 && (v as number) <= MAX_SECONDS)) return refuse("bad_validity", `${field} is not whole seconds since the epoch`);
  }
  if (typeof k.nbf === "number" && typeof k.exp === "number" && k.exp <= k.nbf) return refuse("bad_validity", "exp is not after nbf");
  const raw = typeof k.x === "string" ? decodeBase64url(k.x) : undefined;
  if (!raw || raw.length !== sodium.crypto_sign_PUBLICKEYBYTES) return refuse("bad_x", "x is not 32 bytes of canonical base64url");
  if (!sodium.crypto_core_ed25519_is_valid_point(raw)) return refuse("weak_key", "x is not a canonical point of the prime-order subgroup (small order, off the curve, or a non-canonical encoding)");
  const pub: PublicJwk = {
    kty: "OKP", crv: "Ed25519", x: k.x as string, kid: kid!,
    ...(k.nbf === undefined ? {} : { nbf: k.nbf as number }), ...(k.exp === undefined ? {} : { exp: k.exp as number }),
  };
  return { ok: true, jwk: pub, raw, homeserver: parts.homeserver, thumbprint: jwkThumbprint(pub) };
}

/** RFC 7638: SHA-256 over the required members in lexical order, no whitespace; for a canonical `x` it is the key's one thumbprint. */
export function jwkThumbprint(jwk: { readonly x: string }): string {
  return createHash("sha256").update(`{"crv":"Ed25519","kty":"OKP","x":${JSON.stringify(jwk.x)}}`).digest("base64url");
}

/** The key of a checked JWK, ready for the hot path. */
export function verificationKeyOf(checked: Extract<PeerJwkCheck, { ok: true }>): VerificationKey {
  const { jwk, raw, homeserver, thumbprint } = checked;
  return Object.freeze({
    kid: jwk.kid,
    homeserver,
    publicKey: createPublicKey({ key: { kty: jwk.kty, crv: jwk.crv, x: jwk.x }, format: "jwk" }),
    raw,
    jwk,
    thumbprint,
    validFrom: jwk.nbf,
    validUntil: jwk.exp,
  });
}

/** The same key held with an `exp` from now on: retired. */
export function retiredKey(key: VerificationKey, exp: number): VerificationKey {
  return verificationKeyOf({ ok: true, jwk: { ...key.jwk, exp }, raw: key.raw, homeserver: key.homeserver, thumbprint: key.thumbprint });
}

/** A peer's (or our own) public key, checked as checkPeerJwk does; a refused key throws `bad_request` with the reason. */
export async function importVerificationKey(jwk: unknown): Promise<VerificationKey> {
  const checked = checkPeerJwk(jwk);
  if (!checked.ok) throw new RelayError("bad_request", `JWK ${checked.kid ?? "(no kid)"} refused (${checked.reason}): ${checked.detail}`);
  return verificationKeyOf(checked);
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
