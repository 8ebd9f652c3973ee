/** Which of this homeserver's keys signs, and what peers are served (src/keys/own-keys.ts): a function of the rows and the time. */
import { describe, expect, it } from "vitest";
import { servedJwks, signingKeyAt, type OwnKeyRow } from "../../src/keys/own-keys.ts";
import type { PrivateJwk } from "../../src/protocol/keys.ts";

const row = (kid: string, signFrom: number, retiredAt: number | null, nbf = signFrom): OwnKeyRow => ({
  kid: `alpha#${kid}`, signFrom, retiredAt,
  privateJwk: { kty: "OKP", crv: "Ed25519", x: `x-${kid}`, d: `d-${kid}`, kid: `alpha#${kid}`, nbf } as PrivateJwk,
});

describe("this homeserver's keys over time", () => {
  // k1 signs from 100; a rotation at 150 with an overlap of 50 made k2, signing from 200, and retired k1 at 200.
  const rows = [row("k2", 200, null), row("k1", 100, 200, 90)];

  it("the key that signs is the latest whose sign_from has passed; none before the first", () => {
    expect(signingKeyAt(rows, 50)).toBeUndefined();
    expect(signingKeyAt(rows, 100)?.kid).toBe("alpha#k1");
    expect(signingKeyAt(rows, 199.9)?.kid).toBe("alpha#k1");
    expect(signingKeyAt(rows, 200)?.kid).toBe("alpha#k2");
    expect(signingKeyAt(rows, 10_000)?.kid).toBe("alpha#k2");
  });

  it("serves every key, whatever the time, in the order they sign, public parts only, a retired one with its exp and its own nbf", () => {
    expect(servedJwks(rows)).toEqual([
      { kty: "OKP", crv: "Ed25519", x: "x-k1", kid: "alpha#k1", nbf: 90, exp: 200 },
      { kty: "OKP", crv: "Ed25519", x: "x-k2", kid: "alpha#k2", nbf: 200 },
    ]);
  });

  it("two keys with the same sign_from: the later kid signs, every process choosing the same", () => {
    expect(signingKeyAt([row("b", 100, null), row("a", 100, null)], 100)?.kid).toBe("alpha#b");
    expect(signingKeyAt([row("a", 100, null), row("b", 100, null)], 100)?.kid).toBe("alpha#b");
  });
});

describe("a key retired before it was to sign", () => {
  it("never signs: the key before it signs on", () => {
    const rows = [row("k1", 100, null), row("k2", 300, 200)];
    expect(signingKeyAt(rows, 400)?.kid).toBe("alpha#k1");
  });
});
