/** The libsodium functions the relay uses (sodium-native ships no types). */
declare module "sodium-native" {
  /** Ed25519: true when `signature` (64 bytes) is `publicKey`'s (32 bytes) over `message`. */
  export function crypto_sign_verify_detached(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean;
  /** Ed25519: writes `secretKey`'s signature over `message` into `signature` (64 bytes). */
  export function crypto_sign_detached(signature: Uint8Array, message: Uint8Array, secretKey: Uint8Array): void;
  /** Ed25519: the key pair of a 32-byte seed (publicKey 32 bytes, secretKey 64: seed then public key). */
  export function crypto_sign_seed_keypair(publicKey: Uint8Array, secretKey: Uint8Array, seed: Uint8Array): void;
  /** Ed25519: true when the 32 bytes are a canonical encoding of a point on the curve, in the prime-order subgroup, not of small order. */
  export function crypto_core_ed25519_is_valid_point(point: Uint8Array): boolean;
  /** Ed25519: writes the point p + q into `r` (each 32 bytes). */
  export function crypto_core_ed25519_add(r: Uint8Array, p: Uint8Array, q: Uint8Array): void;
  const sodium: {
    crypto_core_ed25519_add: typeof crypto_core_ed25519_add;
    crypto_core_ed25519_is_valid_point: typeof crypto_core_ed25519_is_valid_point;
    crypto_sign_verify_detached: typeof crypto_sign_verify_detached;
    crypto_sign_detached: typeof crypto_sign_detached;
    crypto_sign_seed_keypair: typeof crypto_sign_seed_keypair;
    readonly crypto_sign_BYTES: number;
    readonly crypto_sign_SEEDBYTES: number;
    readonly crypto_sign_PUBLICKEYBYTES: number;
    readonly crypto_sign_SECRETKEYBYTES: number;
  };
  export default sodium;
}
