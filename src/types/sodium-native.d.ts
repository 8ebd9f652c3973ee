/** The one libsodium function the relay uses (sodium-native ships no types). */
declare module "sodium-native" {
  /** Ed25519: true when `signature` (64 bytes) is `publicKey`'s (32 bytes) over `message`. */
  export function crypto_sign_verify_detached(signature: Uint8Array, message: Uint8Array, publicKey: Uint8Array): boolean;
  const sodium: { crypto_sign_verify_detached: typeof crypto_sign_verify_detached };
  export default sodium;
}
