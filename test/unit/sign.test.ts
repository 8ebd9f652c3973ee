/**
 * Signing with libsodium (src/protocol/sign.ts): Ed25519 is deterministic, so
 * a token must be byte for byte what jose's CompactSign makes of the same
 * header and payload, and jose must verify it; a key whose public half is not
 * its seed's is refused at import, not discovered by every peer.
 */
import { CompactSign, compactVerify, importJWK } from "jose";
import { describe, expect, it } from "vitest";
import { EVENT_ALG, EVENT_TYP, REPORT_TYP } from "../../src/protocol/claims.ts";
import { generateSigningJwk, importSigningKey } from "../../src/protocol/keys.ts";
import { signEvent, signReport, signToken } from "../../src/protocol/sign.ts";

const NOW = 1_750_000_000;

describe("signing with libsodium", () => {
  it("makes the same bytes as jose for events and reports, over payloads of every shape, and jose verifies them", async () => {
    const jwk = await generateSigningJwk("alpha", "k1", NOW);
    const key = importSigningKey(jwk);
    const joseKey = await importJWK(jwk, "EdDSA");
    const joseVerifier = await importJWK(key.publicJwk, "EdDSA");
    const payloads: object[] = [
      { iss: "alpha", aud: "beta", jti: "e1", iat: NOW, exp: NOW + 60, grp: "g@alpha", rcpt: [{ cid: "bob", cap: "x" }], body: "aGk" },
      { unicode: "héllo ✓ 𝄞", quote: "\"\\", empty: [], nested: { a: [1, 2.5, -1e-7, null, true] } },
      {},
    ];
    for (const payload of payloads) {
      for (const typ of [EVENT_TYP, REPORT_TYP]) {
        const ours = await signToken(payload, typ, key);
        const theirs = await new CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
          .setProtectedHeader({ alg: EVENT_ALG, kid: key.kid, typ }).sign(joseKey);
        expect(ours).toBe(theirs);
        const { payload: verified, protectedHeader } = await compactVerify(ours, joseVerifier);
        expect(JSON.parse(new TextDecoder().decode(verified))).toEqual(payload);
        expect(protectedHeader).toEqual({ alg: EVENT_ALG, kid: key.kid, typ });
      }
    }
    expect((await signEvent(payloads[0] as never, key)).split(".")[0]).toBe((await signToken({}, EVENT_TYP, key)).split(".")[0]);
    expect((await signReport({} as never, key)).split(".")[0]).toBe((await signToken({}, REPORT_TYP, key)).split(".")[0]);
  });

  it("refuses a private key whose x is not the public key of its d, or whose d is not a 32-byte seed", async () => {
    const a = await generateSigningJwk("alpha", "k1", NOW);
    const b = await generateSigningJwk("alpha", "k2", NOW);
    expect(() => importSigningKey({ ...a, x: b.x })).toThrow(/x is not the public key of d/);
    expect(() => importSigningKey({ ...a, d: Buffer.alloc(31).toString("base64url") })).toThrow(/d is not a 32-byte Ed25519 seed|not a valid Ed25519 private key/);
  });
});
