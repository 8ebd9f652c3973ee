/**
 * Keys for tests of key sets: good Ed25519 keys, and every kind of key the
 * relay refuses (weak points computed here from the curve's equation, not
 * copied from the code under test), each with the reason it must give.
 */
import { generateKeyPairSync } from "node:crypto";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import sodium from "sodium-native";
import type { KeyRefusal } from "../../src/protocol/keys.ts";

const P = 2n ** 255n - 19n;
const pow = (b: bigint, e: bigint): bigint => {
  let r = 1n;
  b %= P;
  for (; e > 0n; e >>= 1n, b = (b * b) % P) if (e & 1n) r = (r * b) % P;
  return r;
};
const D = (((-121665n * pow(121666n, P - 2n)) % P) + P) % P;
/** Whether some x lies on the curve at this y: (y² − 1) / (d·y² + 1) is a square mod p. */
const hasX = (y: bigint): boolean => {
  const u = (y * y - 1n + P) % P;
  const v = (D * y * y + 1n) % P;
  const x2 = (u * pow(v, P - 2n)) % P;
  return x2 === 0n || pow(x2, (P - 1n) / 2n) === 1n;
};
const encodeY = (y: bigint): string => {
  const bytes = Buffer.alloc(32);
  for (let i = 0; i < 32; i++) bytes[i] = Number((y >> BigInt(8 * i)) & 0xffn);
  return bytes.toString("base64url");
};
const hex = (h: string): string => Buffer.from(h, "hex").toString("base64url");

export function goodKey(kid: string): { kty: "OKP"; crv: "Ed25519"; x: string; kid: string } {
  const { publicKey } = generateKeyPairSync("ed25519");
  return { kty: "OKP", crv: "Ed25519", x: publicKey.export({ format: "jwk" }).x!, kid };
}

// The points of small order (Ed25519's eight torsion points, and encodings of them), as listed by
// libsodium's blocklist and "Taming the many EdDSAs" (Chalkias et al., 2020).
export const SMALL_ORDER = [
  "0100000000000000000000000000000000000000000000000000000000000000",
  "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
  "0000000000000000000000000000000000000000000000000000000000000000",
  "0000000000000000000000000000000000000000000000000000000000000080",
  "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
  "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
  "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
  "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
];

function offCurveX(): string {
  for (let y = 2n; ; y++) if (!hasX(y)) return encodeY(y);
}

/** y + p for a small y with a point: the same point as y, encoded a second way. */
function nonCanonicalX(): string {
  for (let y = 2n; y < 19n; y++) if (hasX(y)) return encodeY(y + P);
  throw new Error("no y below 19 on the curve");
}

/** A real key plus a point of order 8: on the curve, but outside the prime-order subgroup. */
function mixedOrderX(): string {
  const out = Buffer.alloc(32);
  sodium.crypto_core_ed25519_add(out, Buffer.from(goodKey("x#y").x, "base64url"), Buffer.from(SMALL_ORDER[4]!, "hex"));
  return out.toString("base64url");
}

/** Every kind of key a peer's set may hold that the relay does not take, with the reason it gives. */
export function refusedKinds(): { name: string; jwk: unknown; reason: KeyRefusal | "other_homeserver" }[] {
  const k = (extra: object) => ({ ...goodKey("alpha#bad"), ...extra });
  return [
    ...SMALL_ORDER.map((h, i) => ({ name: `a small-order point (${i + 1} of 8)`, jwk: k({ x: hex(h) }), reason: "weak_key" as const })),
    { name: "a point off the curve", jwk: k({ x: offCurveX() }), reason: "weak_key" },
    { name: "a non-canonical encoding of a point (y + p)", jwk: k({ x: nonCanonicalX() }), reason: "weak_key" },
    { name: "the identity encoded as p + 1", jwk: k({ x: hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f") }), reason: "weak_key" },
    { name: "a point outside the prime-order subgroup (a key plus a torsion point)", jwk: k({ x: mixedOrderX() }), reason: "weak_key" },
    { name: "x in non-canonical base64url (its unused bits set)", jwk: k({ x: `${goodKey("a#b").x.slice(0, 42)}B` }), reason: "bad_x" },
    { name: "x of 31 bytes", jwk: k({ x: Buffer.alloc(31, 1).toString("base64url") }), reason: "bad_x" },
    { name: "x with padding", jwk: k({ x: `${goodKey("a#b").x}=` }), reason: "bad_x" },
    { name: "an X25519 key", jwk: k({ crv: "X25519" }), reason: "not_ed25519" },
    { name: "an EC key", jwk: { kty: "EC", crv: "P-256", x: "AA", y: "AA", kid: "alpha#bad" }, reason: "not_ed25519" },
    { name: "a private key (d)", jwk: k({ d: Buffer.alloc(32, 7).toString("base64url") }), reason: "private_member" },
    { name: "use: enc", jwk: k({ use: "enc" }), reason: "bad_use" },
    { name: "alg: ES256", jwk: k({ alg: "ES256" }), reason: "bad_alg" },
    { name: "key_ops: [sign]", jwk: k({ key_ops: ["sign"] }), reason: "bad_key_ops" },
    { name: "nbf: 1.5", jwk: k({ nbf: 1.5 }), reason: "bad_validity" },
    { name: "exp before nbf", jwk: k({ nbf: 2000, exp: 1000 }), reason: "bad_validity" },
    { name: "exp as a string", jwk: k({ exp: "1796291000" }), reason: "bad_validity" },
    { name: "a kid like peer#2026/01", jwk: k({ kid: "alpha#2026/01" }), reason: "bad_kid" },
    { name: "a kid without #", jwk: k({ kid: "alpha" }), reason: "bad_kid" },
    { name: "no kid", jwk: { kty: "OKP", crv: "Ed25519", x: goodKey("a#b").x }, reason: "bad_kid" },
    { name: "an embedded certificate chain (x5c)", jwk: k({ x5c: ["MIIB"] }), reason: "unknown_member" },
    { name: "a string, not a key", jwk: "alpha#k1", reason: "not_an_object" },
    { name: "null", jwk: null, reason: "not_an_object" },
    { name: "a key of another homeserver", jwk: goodKey("gamma#k1"), reason: "other_homeserver" },
  ];
}


/** What a test JWKS endpoint does with a request: serve its keys, answer 503, never answer, or send a body of the test's. */
export type JwksMode = "serve" | "down" | "hang" | { readonly body: string };

export interface JwksEndpoint {
  readonly url: string;
  /** The keys served in mode "serve". */
  keys: object[];
  mode: JwksMode;
  /** Requests received. */
  fetches: number;
  close(): Promise<void>;
}

/** A peer's JWKS endpoint on a free loopback port, steered by the test. */
export async function startJwksEndpoint(): Promise<JwksEndpoint> {
  const server = createServer((_req, res) => {
    endpoint.fetches += 1;
    const { mode } = endpoint;
    if (mode === "hang") return;
    if (mode === "down") {
      res.statusCode = 503;
      res.end();
      return;
    }
    res.setHeader("content-type", "application/json");
    // Chunked, with no length announced: the relay must stop reading by itself.
    if (typeof mode === "object") {
      for (let i = 0; i < mode.body.length; i += 65_536) res.write(mode.body.slice(i, i + 65_536));
      res.end();
      return;
    }
    res.end(JSON.stringify({ keys: endpoint.keys }));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const endpoint: JwksEndpoint = {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/fedrelay/jwks.json`,
    keys: [],
    mode: "serve",
    fetches: 0,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  return endpoint;
}
