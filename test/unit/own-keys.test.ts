/** Which of this homeserver's keys signs, and what peers are served (src/keys/own-keys.ts): a function of the rows and the time. */
import { describe, expect, it } from "vitest";
import { ownKeySet, type OwnKeyRow } from "../../src/keys/own-keys.ts";
import type { PrivateJwk } from "../../src/protocol/keys.ts";

const row = (kid: string, signFrom: number, retiredAt: number | null, nbf = signFrom): OwnKeyRow => ({
  kid: `alpha#${kid}`, signFrom, retiredAt,
  privateJwk: { kty: "OKP", crv: "Ed25519", x: `x-${kid}`, d: `d-${kid}`, kid: `alpha#${kid}`, nbf } as PrivateJwk,
});

describe("this homeserver's keys over time", () => {
  // k1 signs from 100; a rotation at 150 with an overlap of 50 made k2, signing from 200, and retired k1 at 200.
  const rows = [row("k2", 200, null), row("k1", 100, 200, 90)];

  it("the key that signs is the latest whose sign_from has passed; none before the first", () => {
    expect(ownKeySet(rows, 50).signing).toBeUndefined();
    expect(ownKeySet(rows, 100).signing?.kid).toBe("alpha#k1");
    expect(ownKeySet(rows, 199.9).signing?.kid).toBe("alpha#k1");
    expect(ownKeySet(rows, 200).signing?.kid).toBe("alpha#k2");
    expect(ownKeySet(rows, 10_000).signing?.kid).toBe("alpha#k2");
  });

  it("serves every key from the moment it exists, in the order they sign, public parts only, a retired one with its exp and its own nbf", () => {
    for (const now of [150, 250]) {
      expect(ownKeySet(rows, now).served).toEqual([
        { kty: "OKP", crv: "Ed25519", x: "x-k1", kid: "alpha#k1", nbf: 90, exp: 200 },
        { kty: "OKP", crv: "Ed25519", x: "x-k2", kid: "alpha#k2", nbf: 200 },
      ]);
    }
  });

  it("two keys with the same sign_from: the later kid signs, every process choosing the same", () => {
    expect(ownKeySet([row("b", 100, null), row("a", 100, null)], 100).signing?.kid).toBe("alpha#b");
    expect(ownKeySet([row("a", 100, null), row("b", 100, null)], 100).signing?.kid).toBe("alpha#b");
  });
});

describe("a key retired before it was to sign", () => {
  it("never signs: the key before it signs on", () => {
    const rows = [row("k1", 100, null), row("k2", 300, 200)];
    expect(ownKeySet(rows, 400).signing?.kid).toBe("alpha#k1");
  });
});
