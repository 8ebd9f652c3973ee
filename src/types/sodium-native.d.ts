/** The libsodium functions the relay uses (sodium-native ships no types). */
declare module "sodium-native" {
  /** Ed25519: true when `signature` (64 bytes) is `publicKey`'s (32 bytes) over `message`. */
  export function crypto_sign_verify_detached(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean;
  /** Ed25519: writes `secretKey`'s signature over `message` into `signature` (64 bytes). */
  export function crypto_sign_detached(signature: Uint8Array, message: Uint8Array, secretKey: Uint8Array): void;
  /** Ed25519: the key pair of a 32-byte seed (publicKey 32 bytes, secretKey 64: seed then public key). */
  export function crypto_sign_seed_keypair(publicKey: Uint8Array, secretKey: Uint8Array, seed: Uint8Array): void;
  const sodium: {
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
