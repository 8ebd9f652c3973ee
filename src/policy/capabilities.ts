/** Delivery capabilities (DESIGN §6): 32 random bytes, base64url; only their SHA-256 is stored. */
import { hash, randomBytes } from "node:crypto";

export function newCapabilitySecret(): string {
  return randomBytes(32).toString("base64url");
}

export function capabilityHash(secret: string): Buffer {
  return hash("sha256", secret, "buffer");
}

/** The same hash in hex, as the commit matches it (one call a recipient: the one-shot API, no Hash object). */
export function capabilityHashHex(secret: string): string {
  return hash("sha256", secret, "hex");
}
