/**
 * One strict parser (issue 15): a member named twice anywhere in a JWS header
 * or claims set is `malformed`, and reports are read as strictly as events.
 */
import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_EVENT_LIMITS, EVENT_TYP, REPORT_TYP } from "../../src/protocol/claims.ts";
import { generateSigningJwk, importSigningKey, importVerificationKey, type SigningKey, type VerificationKey } from "../../src/protocol/keys.ts";
import { reportClaims, verifyReport } from "../../src/protocol/report.ts";
import { signToken } from "../../src/protocol/sign.ts";
import { hasRepeatedMember, parseStrictObject } from "../../src/protocol/strict-json.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { verifyEvent, type KeyResolver } from "../../src/protocol/verify.ts";

describe("hasRepeatedMember", () => {
  it("finds a name given twice in any object, however it is spelt, and nothing else", () => {
    const repeated = [
      '{"iss":"a","iss":"b"}',
      '{"a":1,"b":{"c":2,"c":3}}',
      '{"rcpt":[{"cid":"x","cid":"y"}]}',
      '{"iss":"a","\\u0069ss":"b"}',
      '{"a" : 1 , "a"\n:\t2}',
      '[1,{"k":{},"k":[]}]',
      `{${Array.from({ length: 40 }, (_, i) => `"k${i}":${i}`).join(",")},"k39":0}`,
    ];
    const fine = [
      '{"iss":"a","aud":"a"}',
      '{"a":{"a":{"a":1}}}',
      '{"s":"\\"a\\":1,\\"a\\":2"}',
      '{"a":"{\\"b\\":1}","b":"[\\"b\\",\\"b\\"]"}',
      '{"x":"\\\\","y":"\\\\\\""}',
      '[{"a":1},{"a":2}]',
      '{"a":["a","a"],"b":"a"}',
      `{${Array.from({ length: 40 }, (_, i) => `"k${i}":${i}`).join(",")}}`,
      "{}", "[]", '"a"', "1",
    ];
    for (const text of repeated) expect({ text, repeated: hasRepeatedMember(text) }).toEqual({ text, repeated: true });
    for (const text of fine) expect({ text, repeated: hasRepeatedMember(text) }).toEqual({ text, repeated: false });
  });

  it("agrees with an object's own key count: JSON.stringify never repeats; repeating any key of any object is found", () => {
    fc.assert(fc.property(fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 3 }), { minKeys: 1, maxKeys: 30 }), fc.nat(), (object, pick) => {
      const text = JSON.stringify(object);
      expect(hasRepeatedMember(text)).toBe(false);
      const keys = Object.keys(object);
      const key = keys[pick % keys.length]!;
      // The same key again at the end of the outer object.
      expect(hasRepeatedMember(`${text.slice(0, -1)},${JSON.stringify(key)}:0}`)).toBe(true);
    }));
  });

  it("parseStrictObject takes objects only, once each name", () => {
    expect(parseStrictObject('{"a":1}')).toEqual({ a: 1 });
    for (const text of ['{"a":1,"a":1}', "[1]", "null", "{", '"x"']) expect(parseStrictObject(text)).toBeUndefined();
  });

  it("costs a small share of verifying an event's signature: a 1,000-recipient claims set scans in one pass", () => {
    const claims = JSON.stringify({ iss: "a", rcpt: Array.from({ length: 1000 }, (_, i) => ({ cid: `client-${i}`, cap: "x".repeat(43) })) });
    expect(claims.length).toBeGreaterThan(60_000);
    expect(hasRepeatedMember(claims)).toBe(false);
  });
});

const ALPHA = "alpha.example";
const BETA = "beta.example.org";
const NOW = 1_750_000_000;
let key: SigningKey;
let resolver: KeyResolver;

beforeAll(async () => {
  key = importSigningKey(await generateSigningJwk(ALPHA, "k1", NOW - 86_400));
  const verification: VerificationKey = await importVerificationKey(key.publicJwk);
  resolver = { isKnown: (h) => h === ALPHA, lookup: (kid) => (kid === key.kid ? { status: "found", key: verification } : { status: "unknown", detail: `no key ${kid}` }) };
});

const b64 = (text: string): string => Buffer.from(text).toString("base64url");

/** A token of the given header and claims text, signed as is. */
async function signedText(headerText: string, payloadText: string): Promise<string> {
  const { sign } = await import("node:crypto");
  const input = `${b64(headerText)}.${b64(payloadText)}`;
  return `${input}.${sign(null, Buffer.from(input), key.privateKey).toString("base64url")}`;
}

describe("events: a member named twice is malformed", () => {
  const claims = (): Record<string, unknown> => ({
    iss: ALPHA, aud: BETA, jti: "e1", iat: NOW, exp: NOW + 3600, grp: `g@${ALPHA}`, rcpt: [{ cid: "bob" }], body: b64("hi"),
  });
  const verify = (token: string) => verifyEvent(Buffer.from(token), inboxSubject(BETA, ALPHA), {
    self: BETA, limits: DEFAULT_EVENT_LIMITS, keys: resolver, isSenderAllowed: () => true, now: NOW,
  });
  const header = `{"alg":"EdDSA","kid":"${"KID"}","typ":"${EVENT_TYP}"}`;

  it("accepts the event signed as plain JSON, and refuses it with iss, jti, a recipient's cid, or the header's alg given twice", async () => {
    const h = header.replace("KID", key.kid);
    const text = JSON.stringify(claims());
    expect((await verify(await signedText(h, text))).ok).toBe(true);
    const cases: [string, string, string][] = [
      ["iss twice", h, text.replace("{", `{"iss":"${ALPHA}",`)],
      ["jti twice, escaped", h, text.replace("{", '{"\\u006Ati":"other",')],
      ["cid twice", h, text.replace('{"cid":"bob"}', '{"cid":"eve","cid":"bob"}')],
      ["alg twice", h.replace("{", '{"alg":"none",'), text],
    ];
    for (const [name, headerText, payloadText] of cases) {
      const verdict = await verify(await signedText(headerText, payloadText));
      expect({ name, verdict }).toEqual({ name, verdict: { ok: false, reason: "malformed", detail: expect.stringMatching(/names? a member twice/) } });
    }
  });
});

describe("reports are read as strictly as events", () => {
  const claims = reportClaims({ destination: ALPHA, sender: BETA, ref: "e1", accepted: ["bob"], refused: [], now: NOW });
  const report = () => claims;
  const verify = (token: string) => verifyReport(token, ALPHA, { self: BETA, keys: resolver, receivedAt: NOW });

  it("accepts a report as signed, and refuses it with whitespace or padding in a part, a member named twice, or an extra header member", async () => {
    const token = await signToken(report(), REPORT_TYP, key);
    expect(await verify(token)).toEqual({ ok: true, claims: report() });
    const [h, p, s] = token.split(".") as [string, string, string];
    const header = `{"alg":"EdDSA","kid":"${key.kid}","typ":"${REPORT_TYP}"}`;
    const cases: [string, string][] = [
      ["a space in the signature", `${h}.${p}.${s.slice(0, 10)} ${s.slice(10)}`],
      ["= padding on the signature", `${h}.${p}.${s}==`],
      ["a trailing newline", `${token}\n`],
      ["standard base64 signature", `${h}.${p}.${Buffer.from(s, "base64url").toString("base64")}`],
      ["iss twice", await signedText(header, JSON.stringify(report()).replace("{", `{"iss":"${BETA}",`))],
      ["a jku header", await signedText(header.replace("{", '{"jku":"https://evil.example/jwks",'), JSON.stringify(report()))],
    ];
    for (const [name, bad] of cases) {
      expect({ name, ok: (await verify(bad)).ok }).toEqual({ name, ok: false });
    }
  });
});
