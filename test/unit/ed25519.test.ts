/**
 * The hot path verifies signatures with libsodium (src/protocol/verify.ts); jose
 * and node:crypto (OpenSSL) verify everything else. Switching verifiers must not
 * change which signatures count: for honest signatures and their mutations the
 * two agree, case by case.
 */
import { generateKeyPairSync, sign, verify } from "node:crypto";
import fc from "fast-check";
import sodium from "sodium-native";
import { describe, expect, it } from "vitest";
import { importVerificationKey, type PublicJwk } from "../../src/protocol/keys.ts";

const KEYS = Array.from({ length: 4 }, () => {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  const jwk = { ...publicKey.export({ format: "jwk" }), kid: "alpha#k" } as PublicJwk;
  return { publicKey, privateKey, jwk };
});

describe("libsodium and node:crypto agree on Ed25519", () => {
  it("the raw key the relay verifies with is the JWK's x", async () => {
    for (const k of KEYS) {
      const key = await importVerificationKey(k.jwk);
      expect(key.raw.toString("base64url")).toBe(k.jwk.x);
      expect(key.raw.length).toBe(32);
    }
  });

  it("on honest signatures, and on every one of them with one bit flipped in the message or the signature", async () => {
    const raws = await Promise.all(KEYS.map(async (k) => (await importVerificationKey(k.jwk)).raw));
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: KEYS.length - 1 }),
        fc.uint8Array({ minLength: 0, maxLength: 600 }),
        fc.oneof(fc.constant("none" as const), fc.constant("message" as const), fc.constant("signature" as const)),
        fc.nat(),
        (k, bytes, flip, at) => {
          const message = Buffer.from(bytes);
          const signature = sign(null, message, KEYS[k]!.privateKey);
          const target = flip === "message" ? message : flip === "signature" ? signature : undefined;
          if (target && target.length > 0) target[at % target.length]! ^= 1 << (at % 8);
          const openssl = verify(null, message, KEYS[k]!.publicKey, signature);
          expect(sodium.crypto_sign_verify_detached(signature, message, raws[k]!)).toBe(openssl);
          if (flip === "none") expect(openssl).toBe(true);
        },
      ),
      { numRuns: 2000 },
    );
  });

  it("on arbitrary 64-byte signatures and on another key's signature", async () => {
    const raws = await Promise.all(KEYS.map(async (k) => (await importVerificationKey(k.jwk)).raw));
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 64, maxLength: 64 }), fc.uint8Array({ maxLength: 100 }), (sig, msg) => {
        const signature = Buffer.from(sig);
        const message = Buffer.from(msg);
        expect(sodium.crypto_sign_verify_detached(signature, message, raws[0]!)).toBe(verify(null, message, KEYS[0]!.publicKey, signature));
      }),
      { numRuns: 500 },
    );
    const message = Buffer.from("signed by key 1");
    const signature = sign(null, message, KEYS[1]!.privateKey);
    expect(sodium.crypto_sign_verify_detached(signature, message, raws[0]!)).toBe(false);
    expect(verify(null, message, KEYS[0]!.publicKey, signature)).toBe(false);
  });
});
