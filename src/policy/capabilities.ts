/** Delivery capabilities (DESIGN §6): 32 random bytes, base64url; only their SHA-256 is stored. */
import { createHash, randomBytes } from "node:crypto";

export function newCapabilitySecret(): string {
  return randomBytes(32).toString("base64url");
}

export function capabilityHash(secret: string): Buffer {
  return createHash("sha256").update(secret).digest();
}
