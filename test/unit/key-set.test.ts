/**
 * A peer's key set, judged key by key (src/keys/key-set.ts, src/protocol/keys.ts):
 * every kind of key the relay refuses is refused for its own reason, and never
 * costs the other keys of the set.
 */
import { calculateJwkThumbprint } from "jose";
import sodium from "sodium-native";
import { describe, expect, it } from "vitest";
import { DEFAULT_KEY_SET_LIMITS, parseKeySet, planKeySet } from "../../src/keys/key-set.ts";
import { checkPeerJwk, jwkThumbprint } from "../../src/protocol/keys.ts";
import { goodKey, refusedKinds } from "../helpers/keys.ts";

describe("a key the relay refuses", () => {
  for (const kind of refusedKinds()) {
    it(`${kind.name}: refused as ${kind.reason}, and the keys before and after it in the set are taken`, () => {
      const before = goodKey("alpha#before");
      const after = goodKey("alpha#after");
      const plan = planKeySet("alpha", [before, kind.jwk, after], new Map());
      expect(plan.add.map((c) => c.jwk.kid)).toEqual(["alpha#before", "alpha#after"]);
      expect(plan.refused.map((r) => r.reason)).toEqual([kind.reason]);
      expect(plan.refused[0]!.detail.length).toBeGreaterThan(0);
    });
  }

  it("libsodium's own check agrees on the weak points: none of them is a valid point, the good keys all are", () => {
    for (const kind of refusedKinds().filter((k) => k.reason === "weak_key")) {
      expect(sodium.crypto_core_ed25519_is_valid_point(Buffer.from((kind.jwk as { x: string }).x, "base64url")), kind.name).toBe(false);
    }
    for (let i = 0; i < 50; i++) expect(sodium.crypto_core_ed25519_is_valid_point(Buffer.from(goodKey("a#b").x, "base64url"))).toBe(true);
  });
});

describe("a key set's kids", () => {
  it("a kid listed twice with different keys is refused (both), and the rest are taken", () => {
    const [a, b, c] = [goodKey("alpha#dup"), goodKey("alpha#dup"), goodKey("alpha#k1")];
    const plan = planKeySet("alpha", [a, c, b], new Map());
    expect(plan.add.map((k) => k.jwk.kid)).toEqual(["alpha#k1"]);
    expect(plan.refused).toEqual([{ kid: "alpha#dup", reason: "duplicate_kid", detail: expect.stringContaining("2 different keys") }]);
  });

  it("a kid listed twice with the same key is taken once", () => {
    const a = goodKey("alpha#k1");
    const plan = planKeySet("alpha", [a, { ...a }], new Map());
    expect(plan.add.map((k) => k.jwk.kid)).toEqual(["alpha#k1"]);
    expect(plan.refused).toEqual([]);
  });

  it("a known kid served with another key is refused as rebound; served with its own key it is neither added nor refused", () => {
    const known = goodKey("alpha#k1");
    const rebound = goodKey("alpha#k1");
    const fresh = goodKey("alpha#k2");
    const bound = new Map([["alpha#k1", { thumbprint: jwkThumbprint(known), nbf: undefined, exp: undefined }]]);
    expect(planKeySet("alpha", [known, fresh], bound)).toEqual({ add: [expect.objectContaining({ jwk: fresh })], refused: [], seen: [jwkThumbprint(known)], retire: [] });
    const plan = planKeySet("alpha", [rebound, fresh], bound);
    expect(plan.add.map((k) => k.jwk.kid)).toEqual(["alpha#k2"]);
    expect(plan.refused).toEqual([{ kid: "alpha#k1", reason: "rebound_kid", detail: expect.stringContaining(jwkThumbprint(rebound)) }]);
  });
});

describe("a known key's window", () => {
  const key = goodKey("alpha#k1");
  const known = (nbf: number | undefined, exp: number | undefined) => new Map([["alpha#k1", { thumbprint: jwkThumbprint(key), nbf, exp }]]);
  const served = (window: { nbf?: number; exp?: number }) => [{ ...key, ...window }];
  const cases: { name: string; held: [number | undefined, number | undefined]; served: { nbf?: number; exp?: number }; retire: number | undefined; refused: boolean }[] = [
    { name: "the same, without exp", held: [100, undefined], served: { nbf: 100 }, retire: undefined, refused: false },
    { name: "the same, with exp", held: [100, 500], served: { nbf: 100, exp: 500 }, retire: undefined, refused: false },
    { name: "an exp where it had none: retired", held: [100, undefined], served: { nbf: 100, exp: 500 }, retire: 500, refused: false },
    { name: "an earlier exp: retired sooner", held: [100, 500], served: { nbf: 100, exp: 300 }, retire: 300, refused: false },
    { name: "a later exp: refused, a retirement is never undone", held: [100, 500], served: { nbf: 100, exp: 900 }, retire: undefined, refused: true },
    { name: "no exp where it had one: refused", held: [100, 500], served: { nbf: 100 }, retire: undefined, refused: true },
    { name: "another nbf: refused", held: [100, undefined], served: { nbf: 50 }, retire: undefined, refused: true },
    { name: "an nbf where it had none: refused", held: [undefined, undefined], served: { nbf: 50 }, retire: undefined, refused: true },
  ];
  for (const c of cases) {
    it(`${c.name}`, () => {
      const plan = planKeySet("alpha", served(c.served), known(...c.held));
      expect(plan.retire).toEqual(c.retire === undefined ? [] : [{ kid: "alpha#k1", exp: c.retire }]);
      expect(plan.refused.map((r) => r.reason)).toEqual(c.refused ? ["validity_widened"] : []);
      expect(plan.add).toEqual([]);
    });
  }
});

describe("what is kept of a key", () => {
  it("only the public members the protocol defines, whatever else harmless it carried (use, alg, key_ops, ext)", () => {
    const jwk = { ...goodKey("alpha#k1"), use: "sig", alg: "EdDSA", key_ops: ["verify"], ext: true, nbf: 100, exp: 200 };
    const checked = checkPeerJwk(jwk);
    expect(checked).toEqual({ ok: true, jwk: { kty: "OKP", crv: "Ed25519", x: jwk.x, kid: "alpha#k1", nbf: 100, exp: 200 }, raw: Buffer.from(jwk.x, "base64url"), homeserver: "alpha", thumbprint: jwkThumbprint(jwk) });
  });

  it("its thumbprint is RFC 7638's, as jose computes it", async () => {
    for (let i = 0; i < 20; i++) {
      const jwk = goodKey("alpha#k1");
      expect(jwkThumbprint(jwk)).toBe(await calculateJwkThumbprint({ kty: jwk.kty, crv: jwk.crv, x: jwk.x }));
    }
  });
});

describe("a key set's size", () => {
  const limits = { maxBytes: 2000, maxKeys: 3 };
  it("is refused whole past its key count or its bytes, or when it names a member twice or has no keys array", () => {
    const keys = (n: number) => JSON.stringify({ keys: Array.from({ length: n }, (_, i) => goodKey(`alpha#k${i}`)) });
    expect(parseKeySet(keys(3), limits)).toEqual({ ok: true, keys: expect.any(Array) });
    expect(parseKeySet(keys(4), limits)).toEqual({ ok: false, detail: "the key set lists 4 keys, over 3" });
    expect(parseKeySet(`${keys(1)}${" ".repeat(2000)}`, limits)).toEqual({ ok: false, detail: "the key set is over 2000 bytes" });
    expect(parseKeySet('{"keys":[],"keys":[]}', limits)).toEqual({ ok: false, detail: expect.stringContaining("naming each member once") });
    expect(parseKeySet('{"key":[]}', limits)).toEqual({ ok: false, detail: "the key set has no keys array" });
    expect(parseKeySet("[]", limits).ok).toBe(false);
  });

  it("defaults to room for decades of rotations: 1,000 keys in 256 KiB", () => {
    expect(DEFAULT_KEY_SET_LIMITS).toEqual({ maxBytes: 256 * 1024, maxKeys: 1000 });
    const text = JSON.stringify({ keys: Array.from({ length: 1000 }, (_, i) => ({ ...goodKey(`alpha.example.org#2026-${String(i).padStart(4, "0")}`), nbf: 1_796_291_000, exp: 1_796_291_000 })) });
    expect(parseKeySet(text, DEFAULT_KEY_SET_LIMITS).ok).toBe(true);
  });
});
