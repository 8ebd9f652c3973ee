import { createHmac, sign as cryptoSign } from "node:crypto";
import { beforeAll, describe, expect, it } from "vitest";
import type { EventReason } from "../../src/errors.ts";
import { DEFAULT_EVENT_LIMITS, EVENT_TYP, REPORT_TYP, type EventClaims, type EventLimits } from "../../src/protocol/claims.ts";
import {
  generateSigningJwk,
  importSigningKey,
  importVerificationKey,
  type PrivateJwk,
  type SigningKey,
  type VerificationKey,
} from "../../src/protocol/keys.ts";
import { signEvent, signToken } from "../../src/protocol/sign.ts";
import { inboxSubject, reportSubject } from "../../src/protocol/subjects.ts";
import { verifyEvent, type KeyLookup, type KeyResolver, type Verdict, type VerifyContext } from "../../src/protocol/verify.ts";

// A fixed clock: nothing here depends on Date.now.
const NOW = 1_750_000_000;
const DAY = 24 * 3600;

const ALPHA = "alpha.example"; // the sender, a known peer
const BETA = "beta.example.org"; // this homeserver (the destination)
const GAMMA = "gamma.example"; // another known peer
const DELTA = "delta.example"; // a homeserver nobody federates with

const FROM_ALPHA = inboxSubject(BETA, ALPHA);
const FROM_GAMMA = inboxSubject(BETA, GAMMA);

const enc = new TextEncoder();

/** A plain in-memory resolver: the only stand-in in this file. */
class MemoryResolver implements KeyResolver {
  readonly #known = new Set<string>();
  readonly #keys = new Map<string, VerificationKey>();
  readonly resolved: string[] = [];

  addPeer(homeserver: string, ...keys: VerificationKey[]): this {
    this.#known.add(homeserver);
    for (const key of keys) this.#keys.set(key.kid, key);
    return this;
  }

  isKnown(homeserver: string): boolean {
    return this.#known.has(homeserver);
  }

  lookup(kid: string): KeyLookup {
    this.resolved.push(kid);
    const key = this.#keys.get(kid);
    return key ? { status: "found", key } : { status: "unknown", detail: `no key ${kid}` };
  }
}

let alphaJwk: PrivateJwk;
let alphaKey: SigningKey;
let gammaJwk: PrivateJwk;
let gammaKey: SigningKey;
/** alpha's key k9: a real key pair, but not published in the registry. */
let alphaUnpublished: SigningKey;
/** alpha's key "future": published with nbf one hour from NOW. */
let alphaFuture: SigningKey;
/** alpha's key "retired": published with exp one hour before NOW. */
let alphaRetired: SigningKey;
let resolver: MemoryResolver;

beforeAll(async () => {
  alphaJwk = await generateSigningJwk(ALPHA, "k1", NOW - 30 * DAY);
  alphaKey = importSigningKey(alphaJwk);
  gammaJwk = await generateSigningJwk(GAMMA, "k1", NOW - 30 * DAY);
  gammaKey = importSigningKey(gammaJwk);

  alphaUnpublished = importSigningKey(await generateSigningJwk(ALPHA, "k9", NOW - 30 * DAY));

  const futureJwk = await generateSigningJwk(ALPHA, "future", NOW + 3600);
  alphaFuture = importSigningKey(futureJwk);
  const retiredJwk: PrivateJwk = { ...(await generateSigningJwk(ALPHA, "retired", NOW - 60 * DAY)), exp: NOW - 3600 };
  alphaRetired = importSigningKey(retiredJwk);

  resolver = new MemoryResolver()
    .addPeer(
      ALPHA,
      await importVerificationKey(alphaKey.publicJwk),
      await importVerificationKey(alphaFuture.publicJwk),
      await importVerificationKey(alphaRetired.publicJwk),
    )
    .addPeer(GAMMA, await importVerificationKey(gammaKey.publicJwk));
});

function context(overrides: Partial<VerifyContext> = {}): VerifyContext {
  return {
    self: BETA,
    limits: DEFAULT_EVENT_LIMITS,
    keys: resolver,
    isSenderAllowed: () => true,
    now: NOW,
    ...overrides,
  };
}

function claims(overrides: Partial<EventClaims> = {}): EventClaims {
  return {
    iss: ALPHA,
    aud: BETA,
    jti: "01J0EVENT0000000000000000A",
    iat: NOW - 10,
    exp: NOW + DAY,
    grp: `room-1@${ALPHA}`,
    rcpt: [
      { cid: "alice", cap: "Y2FwLWFsaWNl" },
      { cid: "bob@device/1", cap: "Y2FwLWJvYg" },
    ],
    body: Buffer.from("opaque MLS ciphertext").toString("base64url"),
    ctype: "message/mls",
    seq: 7,
    ...overrides,
  };
}

function b64(value: unknown): string {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** Builds and EdDSA-signs a token by hand, so header and payload can be anything. */
function craft(header: unknown, payload: unknown, key: SigningKey = alphaKey): string {
  const input = `${b64(header)}.${b64(payload)}`;
  const signature = cryptoSign(null, Buffer.from(input), key.privateKey).toString("base64url");
  return `${input}.${signature}`;
}

function standardHeader(key: SigningKey = alphaKey): Record<string, unknown> {
  return { alg: "EdDSA", kid: key.kid, typ: EVENT_TYP };
}

function verify(token: string | Uint8Array, subject = FROM_ALPHA, ctx: VerifyContext = context()): Promise<Verdict> {
  return verifyEvent(typeof token === "string" ? enc.encode(token) : token, subject, ctx);
}

function expectRefused(verdict: Verdict, reason: EventReason, claimed?: { iss: string; jti: string }): void {
  expect(verdict.ok).toBe(false);
  if (verdict.ok || verdict.deferred) throw new Error(`not refused: ${JSON.stringify(verdict)}`);
  expect(verdict.reason).toBe(reason);
  expect(typeof verdict.detail).toBe("string");
  expect(verdict.detail.length).toBeGreaterThan(0);
  expect(verdict.claimed).toEqual(claimed);
}

const claimedAlpha = (jti = claims().jti) => ({ iss: ALPHA, jti });

function parts(token: string): [string, string, string] {
  const p = token.split(".");
  expect(p).toHaveLength(3);
  return p as [string, string, string];
}

describe("verifyEvent: acceptance", () => {
  it("accepts a well-formed event signed by the sender's current key on the sender's own subject", async () => {
    const c = claims();
    const token = await signEvent(c, alphaKey);
    const verdict = await verify(token);
    expect(verdict.ok).toBe(true);
    if (!verdict.ok) return;
    expect(Buffer.from(verdict.event.bytes).toString("latin1")).toBe(token);
    // Everything but the body, which stays in the bytes.
    const { body: _body, ...withoutBody } = c;
    expect(verdict.event.claims).toEqual(withoutBody);
    expect(verdict.event.key.kid).toBe(`${ALPHA}#k1`);
    expect(verdict.event.key.homeserver).toBe(ALPHA);
    expect(verdict.event.key.jwk.x).toBe(alphaJwk.x);
  });

  it("accepts the minimal claim set (no ctype, no seq, no capability)", async () => {
    const { ctype: _c, seq: _s, ...rest } = claims({ rcpt: [{ cid: "alice" }] });
    const verdict = await verify(await signEvent(rest, alphaKey));
    expect(verdict.ok).toBe(true);
  });

  it("ignores unknown claims (forward compatibility) and still verifies", async () => {
    const verdict = await verify(craft(standardHeader(), { ...claims(), future: { x: 1 } }));
    expect(verdict.ok).toBe(true);
  });

  it("verifies over the bytes of a Uint8Array view that does not start at offset 0", async () => {
    const token = await signEvent(claims(), alphaKey);
    const backing = Buffer.concat([Buffer.from("garbage-before|"), Buffer.from(token), Buffer.from("|after")]);
    const view = new Uint8Array(backing.buffer, backing.byteOffset + 15, token.length);
    expect(Buffer.from(view).toString()).toBe(token);
    const verdict = await verify(view);
    expect(verdict.ok).toBe(true);
    if (verdict.ok) expect(Buffer.from(verdict.event.bytes).toString("latin1")).toBe(token);
  });

  it("accepts a second peer's event on that peer's own subject", async () => {
    const c = claims({ iss: GAMMA, grp: `room@${GAMMA}` });
    const verdict = await verify(await signEvent(c, gammaKey), FROM_GAMMA);
    expect(verdict.ok).toBe(true);
  });

  it("accepts exactly 1000 recipients", async () => {
    const rcpt = Array.from({ length: 1000 }, (_, i) => ({ cid: `client-${i}`, cap: "Y2Fw" }));
    const verdict = await verify(await signEvent(claims({ rcpt }), alphaKey));
    expect(verdict.ok).toBe(true);
  });
});

describe("verifyEvent: size (too_large)", () => {
  it("refuses a message over maxMessageBytes as too_large before parsing it", async () => {
    const token = await signEvent(claims(), alphaKey);
    const limits: EventLimits = { ...DEFAULT_EVENT_LIMITS, maxMessageBytes: token.length - 1 };
    expectRefused(await verify(token, FROM_ALPHA, context({ limits })), "too_large");
  });

  it("accepts a message of exactly maxMessageBytes", async () => {
    const token = await signEvent(claims(), alphaKey);
    const limits: EventLimits = { ...DEFAULT_EVENT_LIMITS, maxMessageBytes: token.length };
    expect((await verify(token, FROM_ALPHA, context({ limits }))).ok).toBe(true);
  });

  it("refuses a message over the default 1 MiB as too_large, even when it is garbage", async () => {
    const big = new Uint8Array(1024 * 1024 + 1).fill(0x41);
    expectRefused(await verify(big), "too_large");
  });

  it("refuses a signed event padded past 1 MiB with an unknown claim as too_large", async () => {
    const padded = { ...claims(), pad: "x".repeat(1024 * 1024) };
    const token = craft(standardHeader(), padded);
    expect(token.length).toBeGreaterThan(1024 * 1024);
    expectRefused(await verify(token), "too_large");
  });

  it("refuses a body decoding to more than maxBodyBytes (64 KiB) as too_large, carrying the claimed iss and jti", async () => {
    const body = Buffer.alloc(64 * 1024 + 1, 7).toString("base64url");
    expectRefused(await verify(await signEvent(claims({ body }), alphaKey)), "too_large", claimedAlpha());
  });

  it("accepts a body of exactly 64 KiB", async () => {
    const body = Buffer.alloc(64 * 1024, 7).toString("base64url");
    expect((await verify(await signEvent(claims({ body }), alphaKey))).ok).toBe(true);
  });

  it("honours a lowered maxBodyBytes", async () => {
    const limits: EventLimits = { ...DEFAULT_EVENT_LIMITS, maxBodyBytes: 16 };
    const ok = await signEvent(claims({ body: Buffer.alloc(16).toString("base64url") }), alphaKey);
    const big = await signEvent(claims({ body: Buffer.alloc(17).toString("base64url") }), alphaKey);
    expect((await verify(ok, FROM_ALPHA, context({ limits }))).ok).toBe(true);
    expectRefused(await verify(big, FROM_ALPHA, context({ limits })), "too_large", claimedAlpha());
  });
});

describe("verifyEvent: compact JWS shape (malformed)", () => {
  it.each([
    ["an empty message", ""],
    ["one part", "abc"],
    ["two parts", "abc.def"],
    ["four parts", "a.b.c.d"],
    ["non-JSON header and payload", `${b64("not json")}.${b64("nor this")}.`],
  ])("refuses %s as malformed", async (_name, token) => {
    expectRefused(await verify(token), "malformed");
  });

  it("refuses a message with non-ASCII bytes as malformed", async () => {
    const token = await signEvent(claims(), alphaKey);
    const bytes = Buffer.concat([Buffer.from(token.slice(0, 5)), Buffer.from([0xc3, 0xa9]), Buffer.from(token.slice(5))]);
    expectRefused(await verify(bytes), "malformed");
  });

  describe("non-canonical base64url", () => {
    it("refuses '=' padding on a part", async () => {
      const [h, p, s] = parts(await signEvent(claims(), alphaKey));
      // An Ed25519 signature is 64 bytes: 86 characters, padded to 88 with "==".
      expect(s).toHaveLength(86);
      expectRefused(await verify(`${h}.${p}.${s}==`), "malformed");
      expectRefused(await verify(`${h}=.${p}.${s}`), "malformed");
    });

    it("refuses '+' and '/' (standard base64) in place of '-' and '_'", async () => {
      const [h, p, s] = parts(await signEvent(claims(), alphaKey));
      const std = (x: string) => x.replaceAll("-", "+").replaceAll("_", "/");
      expectRefused(await verify(`${h}.${p}.+${s.slice(1)}`), "malformed");
      expectRefused(await verify(`${h}.${p}./${s.slice(1)}`), "malformed");
      expectRefused(await verify(`${h}.${p}.${s.slice(0, -1)}+`), "malformed");
      const converted = `${std(h)}.${std(p)}.${std(s)}`;
      if (converted !== `${h}.${p}.${s}`) expectRefused(await verify(converted), "malformed");
    });

    it("refuses a signature look-alike whose last character sets unused trailing bits", async () => {
      const [h, p, s] = parts(await signEvent(claims(), alphaKey));
      // 86 characters carry 516 bits for 512: the low 4 bits of the last character are unused.
      const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
      const last = alphabet.indexOf(s.at(-1)!);
      expect(last & 0x0f).toBe(0);
      const lookAlike = `${s.slice(0, -1)}${alphabet[last | 0x01]}`;
      // Node would decode both to the same 64 bytes, so the signature would still "verify".
      expect(Buffer.from(lookAlike, "base64url").equals(Buffer.from(s, "base64url"))).toBe(true);
      expectRefused(await verify(`${h}.${p}.${lookAlike}`), "malformed");
    });

    it("refuses a header look-alike with non-zero trailing bits", async () => {
      // {"alg":"EdDSA","kid":"alpha.example#k1","typ":"fedrelay-fanout+jwt"} is 67 bytes: 90 chars, 2 unused bits.
      const token = await signEvent(claims(), alphaKey);
      const [h, p, s] = parts(token);
      expect(h.length % 4).not.toBe(0);
      const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
      const last = alphabet.indexOf(h.at(-1)!);
      const lookAlike = `${h.slice(0, -1)}${alphabet[last | 0x01]}`;
      expect(Buffer.from(lookAlike, "base64url").equals(Buffer.from(h, "base64url"))).toBe(true);
      expectRefused(await verify(`${lookAlike}.${p}.${s}`), "malformed");
    });

    it("refuses a part whose length leaves a single dangling character", async () => {
      const [h, p, s] = parts(await signEvent(claims(), alphaKey));
      const dangling = s.length % 4 === 0 ? `${s}A` : `${s}${"A".repeat(5 - (s.length % 4))}`;
      expect(dangling.length % 4).toBe(1);
      expectRefused(await verify(`${h}.${p}.${dangling}`), "malformed");
    });

    it.each([
      ["a leading space", (t: string) => ` ${t}`],
      ["a trailing newline", (t: string) => `${t}\n`],
      ["a trailing CRLF", (t: string) => `${t}\r\n`],
      ["a space inside the payload", (t: string) => t.replace(".", ". ")],
      ["a tab before the signature", (t: string) => t.replace(/\.([^.]*)$/, ".\t$1")],
    ])("refuses surrounding or embedded whitespace: %s", async (_name, mangle) => {
      expectRefused(await verify(mangle(await signEvent(claims(), alphaKey))), "malformed");
    });

    it("refuses a body that is not canonical base64url, carrying the claimed iss and jti", async () => {
      for (const body of ["aGk=", "a+b/", "AB", " AA", "A"]) {
        expectRefused(await verify(await signEvent(claims({ body }), alphaKey)), "malformed", claimedAlpha());
      }
    });
  });

  describe("header members", () => {
    it.each([
      ["jwk", { jwk: { kty: "OKP", crv: "Ed25519", x: "AAAA" } }],
      ["crit", { crit: ["exp"] }],
      ["jku", { jku: "https://attacker.example/jwks.json" }],
      ["x5u", { x5u: "https://attacker.example/cert.pem" }],
      ["x5c", { x5c: ["MIIB"] }],
      ["b64", { b64: false }],
      ["cty", { cty: "JWT" }],
      ["__proto__", JSON.parse('{"__proto__": {"x": 1}}') as Record<string, unknown>],
    ])("refuses an extra header member %s as malformed, even when correctly signed", async (_name, extra) => {
      const verdict = await verify(craft({ ...standardHeader(), ...extra }, claims()));
      expectRefused(verdict, "malformed");
    });

    it("refuses an embedded jwk carrying the attacker's own key as malformed rather than using it", async () => {
      const header = { ...standardHeader(gammaKey), kid: `${ALPHA}#k1`, jwk: gammaKey.publicJwk };
      expectRefused(await verify(craft(header, claims(), gammaKey)), "malformed");
    });
  });

  describe("header and payload must be JSON objects", () => {
    it.each([
      ["an array", []],
      ["null", null],
      ["a string", "EdDSA"],
      ["a number", 42],
      ["true", true],
    ])("refuses a header that is %s as malformed", async (_name, header) => {
      expectRefused(await verify(craft(header, claims())), "malformed");
    });

    it.each([
      ["an array", [claims()]],
      ["null", null],
      ["a string", "claims"],
      ["a number", 42],
      ["false", false],
    ])("refuses a payload that is %s as malformed", async (_name, payload) => {
      expectRefused(await verify(craft(standardHeader(), payload)), "malformed");
    });

    it("refuses a payload that is not JSON at all as malformed", async () => {
      const input = `${b64(standardHeader())}.${b64("{iss: alpha")}`;
      const sig = cryptoSign(null, Buffer.from(input), alphaKey.privateKey).toString("base64url");
      expectRefused(await verify(`${input}.${sig}`), "malformed");
    });
  });

  describe("claims", () => {
    it("refuses a duplicate cid in rcpt as malformed", async () => {
      const rcpt = [
        { cid: "alice", cap: "Y2FwMQ" },
        { cid: "alice", cap: "Y2FwMg" },
      ];
      const verdict = await verify(await signEvent(claims({ rcpt }), alphaKey));
      // The claims never parsed, so nothing is claimed for the audit record.
      expectRefused(verdict, "malformed");
    });

    const { iss: _iss, ...withoutIss } = claims();
    it.each<[string, unknown]>([
      ["missing iss", withoutIss],
      ["an uppercase iss", { ...claims(), iss: "Alpha.example" }],
      ["an empty rcpt", { ...claims(), rcpt: [] }],
      ["1001 recipients", { ...claims(), rcpt: Array.from({ length: 1001 }, (_, i) => ({ cid: `c${i}` })) }],
      ["an invalid cid", { ...claims(), rcpt: [{ cid: "alice smith" }] }],
      ["an empty cap", { ...claims(), rcpt: [{ cid: "alice", cap: "" }] }],
      ["a jti with a dot", { ...claims(), jti: "event.1" }],
      ["a 65-character jti", { ...claims(), jti: "a".repeat(65) }],
      ["a fractional iat", { ...claims(), iat: NOW - 0.5 }],
      ["a string exp", { ...claims(), exp: String(NOW + DAY) }],
      ["a negative iat", { ...claims(), iat: -1 }],
      ["a non-string body", { ...claims(), body: 12 }],
      ["a negative seq", { ...claims(), seq: -1 }],
      ["an empty ctype", { ...claims(), ctype: "" }],
    ])("refuses %s as malformed", async (_name, payload) => {
      expectRefused(await verify(craft(standardHeader(), payload)), "malformed");
    });

    it("refuses a grp that is not <local>@<owner> as malformed, carrying the claimed iss and jti", async () => {
      for (const grp of ["room-without-owner", "room@Alpha.example", "ro om@alpha.example", `@${ALPHA}`]) {
        expectRefused(await verify(await signEvent(claims({ grp }), alphaKey)), "malformed", claimedAlpha());
      }
    });
  });
});

describe("verifyEvent: alg and typ", () => {
  it("refuses an alg:none token with an empty signature as bad_alg", async () => {
    const token = `${b64({ alg: "none", kid: `${ALPHA}#k1`, typ: EVENT_TYP })}.${b64(claims())}.`;
    expectRefused(await verify(token), "bad_alg");
  });

  it("refuses an alg:none token without kid as bad_alg", async () => {
    const token = `${b64({ alg: "none", typ: EVENT_TYP })}.${b64(claims())}.`;
    expectRefused(await verify(token), "bad_alg");
  });

  it("refuses an HS256 token keyed with the sender's public key as bad_alg, before any key is resolved", async () => {
    const seen = resolver.resolved.length;
    const header = { alg: "HS256", kid: `${ALPHA}#k1`, typ: EVENT_TYP };
    const input = `${b64(header)}.${b64(claims())}`;
    const publicKeyBytes = Buffer.from(alphaJwk.x, "base64url");
    expect(publicKeyBytes).toHaveLength(32);
    const mac = createHmac("sha256", publicKeyBytes).update(input).digest("base64url");
    expectRefused(await verify(`${input}.${mac}`), "bad_alg");
    expect(resolver.resolved.length).toBe(seen);
  });

  it.each(["HS384", "HS512", "RS256", "PS256", "ES256", "ES256K", "Ed25519", "eddsa", "EDDSA", ""])(
    "refuses alg %j as bad_alg",
    async (alg) => {
      expectRefused(await verify(craft({ ...standardHeader(), alg }, claims())), "bad_alg");
    },
  );

  it("refuses a missing or non-string alg as bad_alg", async () => {
    expectRefused(await verify(craft({ kid: `${ALPHA}#k1`, typ: EVENT_TYP }, claims())), "bad_alg");
    expectRefused(await verify(craft({ ...standardHeader(), alg: ["EdDSA"] }, claims())), "bad_alg");
  });

  it("refuses a report token (typ fedrelay-report+jwt) presented as an event as bad_typ", async () => {
    const token = await signToken(claims(), REPORT_TYP, alphaKey);
    expectRefused(await verify(token), "bad_typ");
  });

  it.each([["JWT"], ["jwt"], ["FEDRELAY-FANOUT+JWT"], ["fedrelay-fanout"], [""]])(
    "refuses typ %j as bad_typ",
    async (typ) => {
      expectRefused(await verify(await signToken(claims(), typ, alphaKey)), "bad_typ");
    },
  );

  it("refuses a missing typ as bad_typ", async () => {
    expectRefused(await verify(craft({ alg: "EdDSA", kid: `${ALPHA}#k1` }, claims())), "bad_typ");
  });
});

describe("verifyEvent: kid (unknown_key at step 1)", () => {
  it("refuses a kid naming another homeserver than iss as unknown_key", async () => {
    // Signed by gamma's real key, with gamma's real kid, but claiming to be alpha.
    const token = await signEvent(claims(), gammaKey);
    expectRefused(await verify(token), "unknown_key", claimedAlpha());
  });

  it("refuses a kid naming another homeserver without resolving it", async () => {
    const seen = resolver.resolved.length;
    await verify(await signEvent(claims(), gammaKey));
    expect(resolver.resolved.length).toBe(seen);
  });

  it("refuses a kid without '#' as unknown_key", async () => {
    const header = { ...standardHeader(), kid: "alpha.example" };
    expectRefused(await verify(craft(header, claims())), "unknown_key", claimedAlpha());
    const bare = { ...standardHeader(), kid: "k1" };
    expectRefused(await verify(craft(bare, claims())), "unknown_key", claimedAlpha());
  });

  it.each<[string, unknown]>([
    ["missing", undefined],
    ["a number", 1],
    ["empty", ""],
    ["an empty key id", `${ALPHA}#`],
    ["an uppercase homeserver", "Alpha.example#k1"],
    ["a key id with '#'", `${ALPHA}#k#1`],
    ["the homeserver twice", `${ALPHA}#${ALPHA}#k1`],
    ["a suffix of iss", "example#k1"],
  ])("refuses a kid that is %s as unknown_key", async (_name, kid) => {
    const header: Record<string, unknown> = { alg: "EdDSA", typ: EVENT_TYP };
    if (kid !== undefined) header.kid = kid;
    expectRefused(await verify(craft(header, claims())), "unknown_key", claimedAlpha());
  });
});

describe("verifyEvent: sender and key (step 2)", () => {
  it("refuses an event from a homeserver nobody federates with as unknown_sender", async () => {
    const deltaKey = importSigningKey(await generateSigningJwk(DELTA, "k1", NOW - DAY));
    const c = claims({ iss: DELTA, grp: `room@${DELTA}` });
    expectRefused(await verify(await signEvent(c, deltaKey), inboxSubject(BETA, DELTA)), "unknown_sender", {
      iss: DELTA,
      jti: c.jti,
    });
  });

  it("refuses a known sender denied by this homeserver's policy as sender_denied", async () => {
    const denied: string[] = [];
    const ctx = context({
      isSenderAllowed: (iss) => {
        denied.push(iss);
        return iss !== ALPHA;
      },
    });
    expectRefused(await verify(await signEvent(claims(), alphaKey), FROM_ALPHA, ctx), "sender_denied", claimedAlpha());
    expect(denied).toEqual([ALPHA]);
    // The policy is per sender: gamma is still allowed.
    const g = await signEvent(claims({ iss: GAMMA, grp: `room@${GAMMA}` }), gammaKey);
    expect((await verify(g, FROM_GAMMA, ctx)).ok).toBe(true);
  });

  it("refuses a known sender's unknown kid as unknown_key", async () => {
    const token = await signEvent(claims(), alphaUnpublished);
    expectRefused(await verify(token), "unknown_key", claimedAlpha());
    expect(resolver.resolved.at(-1)).toBe(`${ALPHA}#k9`);
  });

  it("refuses an event whose iat precedes the key's nbf as unknown_key", async () => {
    const token = await signEvent(claims(), alphaFuture);
    expectRefused(await verify(token), "unknown_key", claimedAlpha());
  });

  it("accepts a key from iat equal to its nbf", async () => {
    const c = claims({ iat: NOW + 3600, exp: NOW + 3600 + DAY });
    const later = context({ now: NOW + 3600 });
    expect((await verify(await signEvent(c, alphaFuture), FROM_ALPHA, later)).ok).toBe(true);
    const before = claims({ iat: NOW + 3599, exp: NOW + 3599 + DAY });
    expectRefused(await verify(await signEvent(before, alphaFuture), FROM_ALPHA, later), "unknown_key", claimedAlpha());
  });

  it("refuses an event whose iat is at or after the key's exp (a retired key) as unknown_key", async () => {
    // Valid at iat NOW - 3601, but not at NOW - 3600 (exp is exclusive) nor later.
    const atExp = claims({ iat: NOW - 3600 });
    expectRefused(await verify(await signEvent(atExp, alphaRetired)), "unknown_key", claimedAlpha());
    const afterExp = claims({ iat: NOW - 10 });
    expectRefused(await verify(await signEvent(afterExp, alphaRetired)), "unknown_key", claimedAlpha());
  });

  it("accepts an event signed by a retired key while it was still valid", async () => {
    const c = claims({ iat: NOW - 3601, exp: NOW + DAY });
    expect((await verify(await signEvent(c, alphaRetired))).ok).toBe(true);
  });
});

describe("verifyEvent: signature (step 3)", () => {
  it("refuses a valid signature by gamma's key claiming kid alpha#k1 and iss alpha as bad_signature", async () => {
    const impostor = importSigningKey({ ...gammaJwk, kid: `${ALPHA}#k1` });
    expect(impostor.kid).toBe(`${ALPHA}#k1`);
    const token = await signEvent(claims(), impostor);
    expectRefused(await verify(token), "bad_signature", claimedAlpha());
  });

  it("refuses a payload tampered with after signing (one claim changed) as bad_signature", async () => {
    const [h, , s] = parts(await signEvent(claims(), alphaKey));
    const tampered = claims({ rcpt: [{ cid: "mallory", cap: "Y2FwLWFsaWNl" }, { cid: "bob@device/1", cap: "Y2FwLWJvYg" }] });
    expectRefused(await verify(`${h}.${b64(tampered)}.${s}`), "bad_signature", claimedAlpha());
  });

  it("refuses a payload whose exp was extended after signing as bad_signature", async () => {
    const [h, , s] = parts(await signEvent(claims(), alphaKey));
    expectRefused(await verify(`${h}.${b64(claims({ exp: NOW + 2 * DAY }))}.${s}`), "bad_signature", claimedAlpha());
  });

  it("refuses a header re-encoded with the same members in another order as bad_signature", async () => {
    const [, p, s] = parts(await signEvent(claims(), alphaKey));
    const reordered = b64({ typ: EVENT_TYP, kid: `${ALPHA}#k1`, alg: "EdDSA" });
    expectRefused(await verify(`${reordered}.${p}.${s}`), "bad_signature", claimedAlpha());
  });

  it("refuses a signature with one bit flipped as bad_signature", async () => {
    const [h, p, s] = parts(await signEvent(claims(), alphaKey));
    const sig = Buffer.from(s, "base64url");
    sig[10] = sig[10]! ^ 0x01;
    expectRefused(await verify(`${h}.${p}.${sig.toString("base64url")}`), "bad_signature", claimedAlpha());
  });

  it.each([
    ["empty", ""],
    ["63 bytes", Buffer.alloc(63, 1).toString("base64url")],
    ["65 bytes", Buffer.alloc(65, 1).toString("base64url")],
    ["all zeros", Buffer.alloc(64).toString("base64url")],
  ])("refuses an EdDSA token whose signature is %s as bad_signature", async (_name, sig) => {
    const [h, p] = parts(await signEvent(claims(), alphaKey));
    expectRefused(await verify(`${h}.${p}.${sig}`), "bad_signature", claimedAlpha());
  });

  it("refuses alpha's signature transplanted onto another event as bad_signature", async () => {
    const [, , s] = parts(await signEvent(claims(), alphaKey));
    const [h2, p2] = parts(await signEvent(claims({ jti: "other-event" }), alphaKey));
    expectRefused(await verify(`${h2}.${p2}.${s}`), "bad_signature", claimedAlpha("other-event"));
  });
});

describe("verifyEvent: addressing (step 4)", () => {
  it("refuses an event addressed to another homeserver as wrong_audience", async () => {
    const token = await signEvent(claims({ aud: GAMMA }), alphaKey);
    expectRefused(await verify(token), "wrong_audience", claimedAlpha());
  });

  it("refuses gamma's correctly signed event (iss gamma) arriving on alpha's subject as subject_mismatch", async () => {
    const c = claims({ iss: GAMMA, grp: `room@${GAMMA}` });
    const token = await signEvent(c, gammaKey);
    expect((await verify(token, FROM_GAMMA)).ok).toBe(true);
    expectRefused(await verify(token, FROM_ALPHA), "subject_mismatch", { iss: GAMMA, jti: c.jti });
  });

  it.each([
    ["a report subject", reportSubject(BETA, ALPHA)],
    ["a v2 inbox subject", `fedrelay.v2.inbox.beta_example_org.alpha_example`],
    ["a subject with an extra token", `${FROM_ALPHA}.x`],
    ["a truncated subject", "fedrelay.v1.inbox.alpha_example"],
    ["the dotted name instead of the token", `fedrelay.v1.inbox.beta_example_org.alpha.example`],
    ["a wildcard sender", "fedrelay.v1.inbox.beta_example_org.*"],
    ["an empty subject", ""],
  ])("refuses alpha's event arriving on %s as subject_mismatch", async (_name, subject) => {
    expectRefused(await verify(await signEvent(claims(), alphaKey), subject), "subject_mismatch", claimedAlpha());
  });

  it("refuses an event for a group owned by another homeserver as not_group_owner", async () => {
    const token = await signEvent(claims({ grp: `room-1@${GAMMA}` }), alphaKey);
    expectRefused(await verify(token), "not_group_owner", claimedAlpha());
  });

  it("refuses a group whose owner merely ends with iss as not_group_owner", async () => {
    const token = await signEvent(claims({ grp: `room@evil${ALPHA}` }), alphaKey);
    expectRefused(await verify(token), "not_group_owner", claimedAlpha());
  });
});

describe("verifyEvent: time (step 5)", () => {
  it("refuses an event whose exp has passed as expired", async () => {
    const token = await signEvent(claims({ iat: NOW - 2 * DAY, exp: NOW - 1 }), alphaKey);
    expectRefused(await verify(token), "expired", claimedAlpha());
  });

  it("treats exp equal to now as expired", async () => {
    const token = await signEvent(claims({ iat: NOW - DAY, exp: NOW }), alphaKey);
    expectRefused(await verify(token), "expired", claimedAlpha());
    const later = await signEvent(claims({ iat: NOW - DAY, exp: NOW + 1 }), alphaKey);
    expect((await verify(later)).ok).toBe(true);
  });

  it("refuses an iat more than 5 minutes in the future as not_yet_valid", async () => {
    const token = await signEvent(claims({ iat: NOW + 301, exp: NOW + DAY }), alphaKey);
    expectRefused(await verify(token), "not_yet_valid", claimedAlpha());
  });

  it("accepts an iat within the 5-minute clock skew, up to exactly 300 s ahead", async () => {
    for (const ahead of [1, 60, 299, 300]) {
      const token = await signEvent(claims({ iat: NOW + ahead, exp: NOW + DAY }), alphaKey);
      expect((await verify(token)).ok, `iat now+${ahead}`).toBe(true);
    }
  });

  it("honours a configured future skew", async () => {
    const limits: EventLimits = { ...DEFAULT_EVENT_LIMITS, maxFutureSkewSeconds: 0 };
    const token = await signEvent(claims({ iat: NOW + 1, exp: NOW + DAY }), alphaKey);
    expectRefused(await verify(token, FROM_ALPHA, context({ limits })), "not_yet_valid", claimedAlpha());
  });

  it("refuses a lifetime (exp - iat) over 7 days as lifetime_too_long", async () => {
    const token = await signEvent(claims({ iat: NOW - 10, exp: NOW - 10 + 7 * DAY + 1 }), alphaKey);
    expectRefused(await verify(token), "lifetime_too_long", claimedAlpha());
  });

  it("accepts a lifetime of exactly 7 days", async () => {
    const token = await signEvent(claims({ iat: NOW - 10, exp: NOW - 10 + 7 * DAY }), alphaKey);
    expect((await verify(token)).ok).toBe(true);
  });

  it("judges time against ctx.now, not the wall clock", async () => {
    const token = await signEvent(claims(), alphaKey);
    expectRefused(await verify(token, FROM_ALPHA, context({ now: NOW + DAY })), "expired", claimedAlpha());
    expectRefused(await verify(token, FROM_ALPHA, context({ now: NOW - 400 })), "not_yet_valid", claimedAlpha());
  });
});

describe("verifyEvent: order of the checks", () => {
  it("checks size before shape: an oversized malformed message is too_large", async () => {
    const limits: EventLimits = { ...DEFAULT_EVENT_LIMITS, maxMessageBytes: 8 };
    expectRefused(await verify("not.a.jws.at.all", FROM_ALPHA, context({ limits })), "too_large");
  });

  it("checks header members before alg: alg none with a jku is malformed", async () => {
    const token = `${b64({ alg: "none", typ: EVENT_TYP, jku: "https://x.example" })}.${b64(claims())}.`;
    expectRefused(await verify(token), "malformed");
  });

  it("checks alg before typ", async () => {
    expectRefused(await verify(craft({ alg: "HS256", kid: `${ALPHA}#k1`, typ: "JWT" }, claims())), "bad_alg");
  });

  it("checks the sender before its key: an unknown sender with an unknown kid is unknown_sender", async () => {
    const c = claims({ iss: DELTA, grp: `room@${DELTA}` });
    expectRefused(
      await verify(craft({ ...standardHeader(), kid: `${DELTA}#nope` }, c), inboxSubject(BETA, DELTA)),
      "unknown_sender",
      { iss: DELTA, jti: c.jti },
    );
  });

  it("checks the signature before addressing and time: a forged, expired, misaddressed event is bad_signature", async () => {
    const impostor = importSigningKey({ ...gammaJwk, kid: `${ALPHA}#k1` });
    const c = claims({ aud: GAMMA, grp: `room@${GAMMA}`, iat: NOW - 3 * DAY, exp: NOW - DAY });
    expectRefused(await verify(await signEvent(c, impostor), FROM_GAMMA), "bad_signature", claimedAlpha());
  });

  it("checks addressing before time: an expired event for another audience is wrong_audience", async () => {
    const c = claims({ aud: GAMMA, iat: NOW - 3 * DAY, exp: NOW - DAY });
    expectRefused(await verify(await signEvent(c, alphaKey)), "wrong_audience", claimedAlpha());
  });

  it("checks audience, then subject, then group owner", async () => {
    const c = claims({ grp: `room@${GAMMA}` });
    const token = await signEvent(c, alphaKey);
    expectRefused(await verify(token, FROM_GAMMA), "subject_mismatch", claimedAlpha());
    expectRefused(await verify(token, FROM_ALPHA), "not_group_owner", claimedAlpha());
  });

  it("checks not_yet_valid before expired, and expired before lifetime", async () => {
    const future = claims({ iat: NOW + 1000, exp: NOW + 1000 + 8 * DAY });
    expectRefused(await verify(await signEvent(future, alphaKey)), "not_yet_valid", claimedAlpha());
    const old = claims({ iat: NOW - 10 * DAY, exp: NOW - DAY });
    expectRefused(await verify(await signEvent(old, alphaKey)), "expired", claimedAlpha());
  });
});
