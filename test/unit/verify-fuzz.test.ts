/**
 * Bad input (issue 5, item 7): property-based tests of the verification path.
 *
 * A pool of validly signed events (several shapes) is signed once; every case
 * mutates one of them (bit flips, truncation, inserted and deleted bytes, the
 * three JWS parts swapped or duplicated, header/payload re-encoded with reordered
 * or duplicated keys, parts taken from another event, huge and empty fields,
 * unicode and control characters in names, numbers at their limits, wrong types)
 * and feeds the bytes to verifyEvent with the real key registry and a fixed clock.
 *
 * Properties: verifyEvent never throws nor rejects; every refusal names a DESIGN
 * §7 per-event reason; and an event is accepted only if its `header.payload` is
 * exactly one the signer produced and its signature verifies with the signer's
 * public key (node:crypto, independently of src/). A second property re-signs the
 * mutated header and payload, so the checks after the signature are reached too,
 * and holds every accepted event to an independent reading of DESIGN §3 and §5.
 */
import { createPublicKey, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from "node:crypto";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EVENT_REASONS } from "../../src/errors.ts";
import { createKeyRegistry } from "../../src/keys/registry.ts";
import { DEFAULT_EVENT_LIMITS, EVENT_TYP, type EventClaims } from "../../src/protocol/claims.ts";
import { generateSigningJwk, importSigningKey, type PrivateJwk, type SigningKey } from "../../src/protocol/keys.ts";
import { signEvent } from "../../src/protocol/sign.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { verifyEvent, type KeyResolver, type Verdict, type VerifyContext } from "../../src/protocol/verify.ts";

// A fixed clock: nothing here depends on Date.now.
const NOW = 1_750_000_000;
const DAY = 24 * 3600;

const ALPHA = "alpha.example"; // a known peer, the usual sender
const BETA = "beta.example.org"; // this homeserver (the destination)
const GAMMA = "gamma.example"; // another known peer
const DELTA = "delta.example"; // nobody federates with it

const FROM_ALPHA = inboxSubject(BETA, ALPHA);
const FROM_GAMMA = inboxSubject(BETA, GAMMA);
const FROM_DELTA = inboxSubject(BETA, DELTA);

/** Case counts per CI run: the main property alone is 10,000. */
const RUNS = { mutated: 10_000, resigned: 2_000, garbage: 1_500 } as const;

const REASONS: ReadonlySet<string> = new Set(EVENT_REASONS);

// ---------------------------------------------------------------------------
// The signer: every token the tests sign is recorded, with the key that signed it.

interface Signed {
  readonly token: string;
  readonly signingInput: string;
  readonly signature: string;
  readonly kid: string;
  /** Derived from the private key with node:crypto, not from src/. */
  readonly publicKey: KeyObject;
  readonly subject: string;
}

/** `header.payload` → what the signer produced for it. */
const signedInputs = new Map<string, Signed>();
/** The pool the mutations start from. */
const pool: Signed[] = [];

let alphaKey: SigningKey;
let alphaUnpublished: SigningKey; // a real alpha key pair that is not in the registry
let gammaKey: SigningKey;
let keys: KeyResolver;

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown): void => void unhandled.push(reason);

function b64(text: string, encoding: BufferEncoding = "utf8"): string {
  return Buffer.from(text, encoding).toString("base64url");
}

/** Signs `header.payload` built from JSON text by hand (node:crypto), and records it. */
function signText(headerText: string, payloadText: string, key: SigningKey, subject: string): Signed {
  const signingInput = `${b64(headerText)}.${b64(payloadText)}`;
  const signature = cryptoSign(null, Buffer.from(signingInput, "latin1"), key.privateKey).toString("base64url");
  return record(`${signingInput}.${signature}`, key, subject);
}

function record(token: string, key: SigningKey, subject: string): Signed {
  const dot = token.lastIndexOf(".");
  const signed: Signed = {
    token,
    signingInput: token.slice(0, dot),
    signature: token.slice(dot + 1),
    kid: key.kid,
    publicKey: createPublicKey(key.privateKey),
    subject,
  };
  signedInputs.set(signed.signingInput, signed);
  return signed;
}

function context(): VerifyContext {
  return { self: BETA, limits: DEFAULT_EVENT_LIMITS, keys, isSenderAllowed: () => true, now: NOW };
}

function claims(overrides: Partial<EventClaims> = {}): EventClaims {
  return {
    iss: ALPHA,
    aud: BETA,
    jti: "01J0EVENT0000000000000000A",
    iat: NOW - 10,
    exp: NOW + DAY,
    grp: `room-1@${ALPHA}`,
    rcpt: [{ cid: "alice", cap: "Y2FwLWFsaWNlLWNhcGFiaWxpdHktMzItYnl0ZXMtbG9uZw" }],
    body: Buffer.from("opaque MLS ciphertext").toString("base64url"),
    ...overrides,
  };
}

const header = (key: SigningKey): Record<string, unknown> => ({ alg: "EdDSA", kid: key.kid, typ: EVENT_TYP });

async function buildPool(): Promise<void> {
  const many = (n: number, withCap: boolean) =>
    Array.from({ length: n }, (_, i) => ({ cid: `client-${i}@dev/${i % 7}`, ...(withCap ? { cap: `Y2Fw${i}` } : {}) }));
  const viaJose = async (c: EventClaims, key = alphaKey, subject = FROM_ALPHA) => pool.push(record(await signEvent(c, key), key, subject));
  // Accepted shapes.
  await viaJose(claims({ jti: "one-rcpt-ctype-seq", ctype: "message/mls", seq: 7 }));
  await viaJose(claims({ jti: "one-rcpt-bare", rcpt: [{ cid: "bob" }] }));
  await viaJose(claims({ jti: "two-rcpt-ctype", rcpt: [{ cid: "alice", cap: "YQ" }, { cid: "bob@device/1", cap: "Yg" }], ctype: "text/plain" }));
  await viaJose(claims({ jti: "seq-zero", seq: 0 }));
  await viaJose(claims({ jti: "seq-max", seq: Number.MAX_SAFE_INTEGER, ctype: "x".repeat(255) }));
  await viaJose(claims({ jti: "fifty", rcpt: many(50, true), ctype: "message/mls", seq: 123_456 }));
  await viaJose(claims({ jti: "thousand", rcpt: many(1000, true) }));
  await viaJose(claims({ jti: "thousand-bare", rcpt: many(1000, false), seq: 1 }));
  await viaJose(claims({ jti: "empty-body", body: "" }));
  await viaJose(claims({ jti: "body-64k", body: Buffer.alloc(64 * 1024, 0x5a).toString("base64url"), ctype: "application/octet-stream" }));
  await viaJose(claims({ jti: "max-lifetime", iat: NOW - 10, exp: NOW - 10 + 7 * DAY }));
  await viaJose(claims({ jti: "max-skew", iat: NOW + 300, exp: NOW + 301 }));
  await viaJose(claims({ jti: "J".repeat(64), grp: `${"L".repeat(128)}@${ALPHA}` }));
  await viaJose({ ...claims({ jti: "future-claims" }), extra: { nested: [1, "two", null] }, nbf: NOW } as EventClaims);
  await viaJose(claims({ iss: GAMMA, grp: `room@${GAMMA}`, jti: "from-gamma", seq: 3 }), gammaKey, FROM_GAMMA);
  // Validly signed, refused for what they say.
  await viaJose(claims({ jti: "wrong-aud", aud: GAMMA }));
  await viaJose(claims({ jti: "expired", iat: NOW - 2 * DAY, exp: NOW - DAY }));
  await viaJose(claims({ jti: "too-long", exp: NOW + 8 * DAY }));
  await viaJose(claims({ jti: "not-owner", grp: `room@${GAMMA}` }));
  await viaJose(claims({ jti: "unpublished-key" }), alphaUnpublished);
  await viaJose(claims({ jti: "body-too-large", body: Buffer.alloc(64 * 1024 + 1).toString("base64url") }));
  // Hand-built JSON text, signed as is: reordered keys, whitespace, and duplicated keys in the header
  // and the claims (refused: JSON.parse would keep the last, another reader the first).
  const c = claims({ jti: "hand-reordered", ctype: "message/mls", seq: 9 });
  const reordered = Object.fromEntries(Object.entries(c).reverse());
  pool.push(signText(`{"typ":"${EVENT_TYP}","kid":"${alphaKey.kid}","alg":"EdDSA"}`, JSON.stringify(reordered), alphaKey, FROM_ALPHA));
  pool.push(signText(JSON.stringify(header(alphaKey), null, 2), JSON.stringify(claims({ jti: "hand-spaced" }), null, "\t"), alphaKey, FROM_ALPHA));
  const dup = JSON.stringify(claims({ jti: "hand-duplicate", seq: 5 })).replace(/^\{/, `{"aud":"${GAMMA}","seq":"x",`);
  pool.push(signText(`{"alg":"none","alg":"EdDSA","kid":"${alphaKey.kid}","typ":"${EVENT_TYP}"}`, dup, alphaKey, FROM_ALPHA));
  pool.push(signText(JSON.stringify(header(alphaKey)), JSON.stringify(claims({ jti: "hand-unicode", ctype: "text/plain; charset=\"ü\u2028\"" })), alphaKey, FROM_ALPHA));
}

beforeAll(async () => {
  process.on("unhandledRejection", onUnhandled);
  const alphaJwk: PrivateJwk = await generateSigningJwk(ALPHA, "k1", NOW - 30 * DAY);
  alphaKey = importSigningKey(alphaJwk);
  alphaUnpublished = importSigningKey(await generateSigningJwk(ALPHA, "k9", NOW - 30 * DAY));
  const gammaJwk = await generateSigningJwk(GAMMA, "k1", NOW - 30 * DAY);
  gammaKey = importSigningKey(gammaJwk);
  const registry = createKeyRegistry({
    self: { homeserver: BETA, keys: [] },
    peers: { [ALPHA]: { keys: [alphaKey.publicJwk] }, [GAMMA]: { keys: [gammaKey.publicJwk] } },
    fetch: () => Promise.reject(new Error("no network in this test")),
  });
  await registry.ready;
  keys = registry;
  await buildPool();
});

afterAll(() => {
  process.off("unhandledRejection", onUnhandled);
});

// ---------------------------------------------------------------------------
// Mutations: plain data, generated by fast-check, applied to a pool token.

type PartIndex = 0 | 1 | 2;

type JsonEdit =
  | { readonly op: "reorder"; readonly weights: readonly number[] }
  | { readonly op: "duplicate"; readonly index: number; readonly value: string | undefined; readonly after: boolean }
  | { readonly op: "set"; readonly name: string; readonly value: string }
  | { readonly op: "remove"; readonly index: number }
  | { readonly op: "add"; readonly name: string; readonly value: string; readonly rawName: boolean }
  | { readonly op: "rcpt"; readonly index: number; readonly name: string; readonly value: string }
  | { readonly op: "pretty"; readonly space: string }
  | { readonly op: "replace"; readonly text: string };

type Mutation =
  | { readonly kind: "flip"; readonly pos: number; readonly bit: number }
  | { readonly kind: "truncate"; readonly pos: number }
  | { readonly kind: "insert"; readonly pos: number; readonly bytes: Uint8Array }
  | { readonly kind: "delete"; readonly pos: number; readonly len: number }
  | { readonly kind: "overwrite"; readonly pos: number; readonly byte: number }
  | { readonly kind: "substitute"; readonly pos: number; readonly char: number }
  | { readonly kind: "parts"; readonly order: readonly number[] }
  | { readonly kind: "transplant"; readonly part: PartIndex; readonly from: number }
  | { readonly kind: "json"; readonly part: 0 | 1; readonly edit: JsonEdit; readonly latin1: boolean }
  | { readonly kind: "recode"; readonly part: PartIndex; readonly style: "pad" | "pad2" | "std" | "tail" | "space" | "newline" | "nul" };

const HEADER_NAMES = ["alg", "kid", "typ", "crit", "jwk", "jku", "x5u", "x5c", "x5t", "b64", "cty", "zip", "nonce"];
const CLAIM_NAMES = ["iss", "aud", "jti", "iat", "exp", "grp", "rcpt", "body", "ctype", "seq", "nbf", "sub"];
const EVIL_CHARS = [
  "\u0000", "\u0001", "\t", "\n", "\r", "\u001b", "\u007f", "\u0085", "\u00a0", "\u00e9", "\u0430", "\u0130", "\u00df",
  "\u200b", "\u200d", "\u2028", "\u202e", "\ufeff", "\ud800", "\udfff", "\uffff", "\u{1f4a5}", "\u{e0041}",
  "_", ".", "#", "@", " ", "%", "/", "\\", "\"", "*", ">", ":", "=", "+",
];
const NEAR_VALID = [ALPHA, BETA, GAMMA, "alice", "bob@device/1", `room-1@${ALPHA}`, `${ALPHA}#k1`, `${GAMMA}#k1`, "01J0EVENT0000000000000000A", EVENT_TYP, "EdDSA", "message/mls"];

/** JSON text (or deliberately not quite JSON) for a value. */
const valueText: fc.Arbitrary<string> = fc.oneof(
  // Numbers at their limits, and number-like text JSON does not allow.
  fc.constantFrom(
    "9007199254740992", "9007199254740991", "9007199254740993", "-9007199254740992", "-0", "0", "-1", "1e308", "-1e308",
    "1e999", "-1e999", "5e-324", "1.5", "0.1", "1099511627776", "1099511627777", "1e3", "1E+2", "123456789012345678901234567890",
    `${NOW}`, `${NOW + 300}`, `${NOW + 301}`, `${NOW - 1}`, `${NOW}.5`, `${NOW + 7 * DAY}`, `${NOW - 10 + 7 * DAY + 1}`,
    "NaN", "Infinity", "-Infinity", "00", "01", "+1", ".5", "0x10", "1_000",
  ),
  fc.double().map((d) => JSON.stringify(d)),
  fc.integer().map(String),
  // Strings: NaN-as-string, empty, escapes of lone surrogates and NUL, lookalikes.
  fc.constantFrom(
    "\"NaN\"", "\"Infinity\"", "\"\"", "\" \"", "\"\\u0000\"", "\"\\ud800\"", "\"\\udfff\\ud800\"", "\"\\u202e\"", "\"none\"",
    "\"HS256\"", "\"RS256\"", "\"ES256\"", "\"eddsa\"", "\"EDDSA\"", "\"Ed25519\"", "\"EdDSA \"", "\"JWT\"", "\"fedrelay-report+jwt\"",
    `"${ALPHA}#k9"`, `"${ALPHA}#"`, `"#k1"`, `"${ALPHA}"`, `"${ALPHA}#k1#k1"`, `"${DELTA}#k1"`, `"${DELTA}"`, `"${BETA}"`, `"${GAMMA}"`,
    `"room@${DELTA}"`, `"@${ALPHA}"`, `"room@"`, `"a@b@${ALPHA}"`, "\"AA\"", "\"AB\"", "\"A\"", "\"AAA=\"", "\"+/+/\"",
  ),
  fc.string({ unit: "binary", maxLength: 48 }).map((s) => JSON.stringify(s)),
  fc.string({ unit: fc.constantFrom(...EVIL_CHARS), maxLength: 6 }).map((s) => JSON.stringify(s)),
  // Names with one character that does not belong, and their upper case.
  fc.tuple(fc.constantFrom(...NEAR_VALID), fc.nat(), fc.constantFrom(...EVIL_CHARS), fc.boolean()).map(([s, i, c, upper]) => {
    const at = i % (s.length + 1);
    const name = `${s.slice(0, at)}${c}${s.slice(at)}`;
    return JSON.stringify(upper ? name.toUpperCase() : name);
  }),
  // Huge and boundary-sized strings ("A" is canonical base64url: 87382 decodes to exactly 64 KiB).
  fc.oneof(
    fc.constantFrom(0, 1, 63, 64, 65, 128, 129, 253, 254, 255, 256, 257, 87_380, 87_381, 87_382, 87_383, 87_384, 1_048_576),
    fc.integer({ min: 0, max: 1_200_000 }),
  ).chain((n) => fc.constantFrom("A", "a", "\u00e9", "\\u0000").map((c) => `"${c.repeat(n)}"`)),
  // Wrong types.
  fc.constantFrom(
    "null", "true", "false", "[]", "{}", "[null]", "[[]]", "[1,2,3]", "{\"cid\":\"alice\"}", "[{\"cid\":\"alice\"}]",
    "[{\"cid\":\"alice\"},{\"cid\":\"alice\"}]", "[{\"cid\":\"\"}]", "[{\"cid\":\"alice\",\"cap\":\"\"}]", "[{\"cid\":\"alice\",\"cap\":1}]",
    "{\"alg\":\"EdDSA\"}", "[\"EdDSA\"]", "{\"__proto__\":{\"alg\":\"EdDSA\"}}",
  ),
  // Deep nesting.
  fc.tuple(fc.integer({ min: 1, max: 20_000 }), fc.boolean()).map(([n, arr]) => (arr ? `${"[".repeat(n)}${"]".repeat(n)}` : `${"{\"a\":".repeat(n)}1${"}".repeat(n)}`)),
  // Recipient lists around the cap of 1000.
  fc.tuple(fc.integer({ min: 998, max: 1002 }), fc.boolean()).map(([n, dup]) =>
    JSON.stringify(Array.from({ length: n }, (_, i) => ({ cid: dup && i === n - 1 ? "c0" : `c${i}` })))),
  fc.json({ maxDepth: 3 }),
);

/** Values a real event could carry, per member: the edit keeps the event well-formed, so only the signature can catch it. */
const json = (v: unknown): string => JSON.stringify(v);
const PLAUSIBLE: Readonly<Record<string, fc.Arbitrary<string>>> = {
  alg: fc.constant(json("EdDSA")),
  kid: fc.constantFrom(json(`${ALPHA}#k1`), json(`${ALPHA}#k9`), json(`${GAMMA}#k1`)),
  typ: fc.constant(json(EVENT_TYP)),
  iss: fc.constantFrom(json(ALPHA), json(GAMMA)),
  aud: fc.constantFrom(json(BETA), json(GAMMA)),
  jti: fc.stringMatching(/^[A-Za-z0-9_-]{1,64}$/).map(json),
  iat: fc.integer({ min: NOW - DAY, max: NOW + 600 }).map(String),
  exp: fc.integer({ min: NOW - 600, max: NOW + 8 * DAY }).map(String),
  grp: fc.constantFrom(json(`room-2@${ALPHA}`), json(`room@${GAMMA}`), json(`room-1@${ALPHA}`)),
  rcpt: fc.uniqueArray(fc.stringMatching(/^[A-Za-z0-9._~:@/-]{1,16}$/), { minLength: 1, maxLength: 5 })
    .map((cids) => json(cids.map((cid, i) => (i % 2 === 0 ? { cid, cap: "Y2Fw" } : { cid })))),
  body: fc.uint8Array({ maxLength: 48 }).map((b) => json(Buffer.from(b).toString("base64url"))),
  ctype: fc.constantFrom(json("text/plain"), json("message/mls"), json("x")),
  seq: fc.nat().map(String),
};
/** A plausible value for a member, set in the part it belongs to. */
const plausibleEdit: fc.Arbitrary<{ part: 0 | 1; edit: JsonEdit }> = fc.constantFrom(...Object.keys(PLAUSIBLE)).chain((name) =>
  PLAUSIBLE[name]!.map((value) => ({ part: HEADER_NAMES.includes(name) ? (0 as const) : (1 as const), edit: { op: "set" as const, name, value } })));

const nameArb: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...HEADER_NAMES, ...CLAIM_NAMES) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      "__proto__", "constructor", "prototype", "toString", "hasOwnProperty", "", "\u0000", "alg\u0000", "ALG", "Alg", " alg", "alg ",
      "\u0430lg", "\uff41\uff4c\uff47", "ki\u200bd", "t\u0000yp", "i\u0073s", "rcpt\n", "\ud800", "\u{1f4a5}",
    ),
  },
  { weight: 2, arbitrary: fc.string({ unit: "binary", maxLength: 16 }) },
  { weight: 1, arbitrary: fc.string({ unit: fc.constantFrom(...EVIL_CHARS), minLength: 1, maxLength: 4 }) },
  { weight: 1, arbitrary: fc.integer({ min: 1_000, max: 300_000 }).map((n) => "k".repeat(n)) },
);

const jsonEditArb: fc.Arbitrary<JsonEdit> = fc.oneof(
  fc.record({ op: fc.constant("reorder" as const), weights: fc.array(fc.nat(), { maxLength: 12 }) }),
  fc.record({ op: fc.constant("duplicate" as const), index: fc.nat(), value: fc.option(valueText, { nil: undefined }), after: fc.boolean() }),
  { weight: 4, arbitrary: fc.record({ op: fc.constant("set" as const), name: nameArb, value: valueText }) },
  fc.record({ op: fc.constant("remove" as const), index: fc.nat() }),
  { weight: 2, arbitrary: fc.record({ op: fc.constant("add" as const), name: nameArb, value: valueText, rawName: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant("rcpt" as const), index: fc.nat(), name: fc.oneof(fc.constantFrom("cid", "cap"), nameArb), value: valueText }) },
  fc.record({ op: fc.constant("pretty" as const), space: fc.constantFrom(" ", "\t", "\n", "\r\n", "\u00a0", "\u2028", "\ufeff", "\u000b") }),
  fc.record({ op: fc.constant("replace" as const), text: fc.oneof(fc.json(), fc.string({ unit: "binary", maxLength: 64 }), valueText) }),
);

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("flip" as const), pos: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }) },
  fc.record({ kind: fc.constant("truncate" as const), pos: fc.nat() }),
  fc.record({
    kind: fc.constant("insert" as const),
    pos: fc.nat(),
    bytes: fc.oneof(fc.uint8Array({ minLength: 1, maxLength: 8 }), fc.constantFrom(".", "=", "==", " ", "\n", "+", "/", "\u0000", "A", "AAAA", "..").map((s) => Buffer.from(s, "latin1"))),
  }),
  fc.record({ kind: fc.constant("delete" as const), pos: fc.nat(), len: fc.integer({ min: 1, max: 16 }) }),
  fc.record({ kind: fc.constant("overwrite" as const), pos: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }),
  // One base64url character for another: the part stays (mostly) canonical and decodes to other bytes.
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("substitute" as const), pos: fc.nat(), char: fc.integer({ min: 0, max: 63 }) }) },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("parts" as const),
      order: fc.oneof(
        fc.constantFrom([1, 0, 2], [0, 2, 1], [2, 1, 0], [1, 2, 0], [0, 0, 2], [0, 1, 1], [1, 1, 2], [0, 1, 2, 2], [0, 1, 2, 0], [0, 1], [0], [], [0, 1, 2, 1, 2]),
        fc.array(fc.integer({ min: 0, max: 2 }), { maxLength: 6 }),
      ),
    }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("transplant" as const), part: fc.constantFrom<PartIndex>(0, 1, 2), from: fc.nat() }) },
  { weight: 8, arbitrary: fc.record({ kind: fc.constant("json" as const), part: fc.constantFrom<0 | 1>(0, 1), edit: jsonEditArb, latin1: fc.boolean() }) },
  { weight: 6, arbitrary: plausibleEdit.map(({ part, edit }) => ({ kind: "json" as const, part, edit, latin1: false })) },
  fc.record({
    kind: fc.constant("recode" as const),
    part: fc.constantFrom<PartIndex>(0, 1, 2),
    style: fc.constantFrom("pad" as const, "pad2" as const, "std" as const, "tail" as const, "space" as const, "newline" as const, "nul" as const),
  }),
);

/** The top-level members of a JSON object as [key text, value text], in order; [] if not an object. */
function entriesOf(text: string): [string, string][] {
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== "object" || Array.isArray(value)) return [];
    return Object.entries(value).map(([k, v]) => [JSON.stringify(k), JSON.stringify(v) ?? "null"]);
  } catch {
    return []; // not JSON, or too deep to re-serialize: start from an empty object
  }
}

const objectText = (entries: readonly (readonly [string, string])[], colon = ":", comma = ","): string =>
  `{${entries.map(([k, v]) => `${k}${colon}${v}`).join(comma)}}`;

function setMember(entries: [string, string][], name: string, value: string): void {
  const key = JSON.stringify(name);
  const at = entries.map(([k]) => k).lastIndexOf(key);
  if (at >= 0) entries[at] = [key, value];
  else entries.push([key, value]);
}

function editJson(text: string, edit: JsonEdit): string {
  if (edit.op === "replace") return edit.text;
  const entries = entriesOf(text);
  switch (edit.op) {
    case "reorder": {
      if (edit.weights.length === 0) return objectText(entries.reverse());
      const weighted = entries.map((e, i) => ({ e, w: edit.weights[i % edit.weights.length]! }));
      return objectText(weighted.sort((a, b) => a.w - b.w).map(({ e }) => e));
    }
    case "duplicate": {
      if (entries.length === 0) return text;
      const i = edit.index % entries.length;
      const [k, v] = entries[i]!;
      entries.splice(edit.after ? i + 1 : i, 0, [k, edit.value ?? v]);
      return objectText(entries);
    }
    case "set":
      setMember(entries, edit.name, edit.value);
      return objectText(entries);
    case "remove":
      if (entries.length > 0) entries.splice(edit.index % entries.length, 1);
      return objectText(entries);
    case "add":
      entries.push([edit.rawName ? `"${edit.name}"` : JSON.stringify(edit.name), edit.value]);
      return objectText(entries);
    case "rcpt": {
      const at = entries.findIndex(([k]) => k === "\"rcpt\"");
      let list: unknown[] = [{}];
      try {
        const parsed: unknown = at >= 0 ? JSON.parse(entries[at]![1]) : undefined;
        if (Array.isArray(parsed) && parsed.length > 0) list = parsed;
      } catch {
        // keep the one empty recipient
      }
      const i = edit.index % list.length;
      const items = list.map((r, j) => {
        const own = JSON.stringify(r) ?? "null";
        if (j !== i) return own;
        const inner = entriesOf(own);
        setMember(inner, edit.name, edit.value);
        return objectText(inner);
      });
      setMember(entries, "rcpt", `[${items.join(",")}]`);
      return objectText(entries);
    }
    case "pretty":
      return objectText(entries.map(([k, v]) => [`${edit.space}${k}`, `${edit.space}${v}`]), `${edit.space}:`, `,${edit.space}`);
  }
}

const clampPos = (pos: number, length: number): number => pos % (length + 1);

function mutate(input: Buffer, m: Mutation): Buffer {
  switch (m.kind) {
    case "flip": {
      if (input.length === 0) return input;
      const out = Buffer.from(input);
      const i = m.pos % out.length;
      out[i] = out[i]! ^ (1 << m.bit);
      return out;
    }
    case "truncate":
      return input.subarray(0, clampPos(m.pos, input.length));
    case "insert": {
      const at = clampPos(m.pos, input.length);
      return Buffer.concat([input.subarray(0, at), m.bytes, input.subarray(at)]);
    }
    case "delete": {
      const at = clampPos(m.pos, input.length);
      return Buffer.concat([input.subarray(0, at), input.subarray(at + m.len)]);
    }
    case "overwrite": {
      if (input.length === 0) return Buffer.from([m.byte]);
      const out = Buffer.from(input);
      out[m.pos % out.length] = m.byte;
      return out;
    }
    case "substitute": {
      if (input.length === 0) return input;
      const out = Buffer.from(input);
      out[m.pos % out.length] = ALPHABET.charCodeAt(m.char);
      return out;
    }
    case "parts": {
      const parts = input.toString("latin1").split(".");
      return Buffer.from(m.order.map((i) => parts[i % parts.length]!).join("."), "latin1");
    }
    case "transplant": {
      const parts = input.toString("latin1").split(".");
      if (parts.length <= m.part) return input;
      parts[m.part] = pool[m.from % pool.length]!.token.split(".")[m.part]!;
      return Buffer.from(parts.join("."), "latin1");
    }
    case "json": {
      const parts = input.toString("latin1").split(".");
      if (parts.length <= m.part) return input;
      const text = Buffer.from(parts[m.part]!, "base64url").toString("utf8");
      parts[m.part] = b64(editJson(text, m.edit), m.latin1 ? "latin1" : "utf8");
      return Buffer.from(parts.join("."), "latin1");
    }
    case "recode": {
      const parts = input.toString("latin1").split(".");
      if (parts.length <= m.part) return input;
      const p = parts[m.part]!;
      parts[m.part] = recode(p, m.style);
      return Buffer.from(parts.join("."), "latin1");
    }
  }
}

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/** Look-alike encodings of the same bytes (or nearly): each must be refused as malformed. */
function recode(part: string, style: "pad" | "pad2" | "std" | "tail" | "space" | "newline" | "nul"): string {
  switch (style) {
    case "pad":
      return `${part}=`;
    case "pad2":
      return part.length % 4 === 0 ? `${part}==` : `${part}${"=".repeat(4 - (part.length % 4))}`;
    case "std":
      return part.replaceAll("-", "+").replaceAll("_", "/");
    case "tail": {
      // The same decoded bytes, with a non-zero unused bit in the last character.
      if (part.length % 4 < 2) return `${part}A`;
      const last = ALPHABET.indexOf(part.at(-1)!);
      return `${part.slice(0, -1)}${ALPHABET[(last | 1) & 63]!}`;
    }
    case "space":
      return ` ${part}`;
    case "newline":
      return `${part}\n`;
    case "nul":
      return `${part}\u0000`;
  }
}

// ---------------------------------------------------------------------------
// The checks.

function preview(data: Uint8Array): string {
  const text = Buffer.from(data).toString("latin1");
  return text.length <= 300 ? JSON.stringify(text) : `${JSON.stringify(text.slice(0, 300))}… (${text.length} bytes)`;
}

/** What must hold of any verdict on any bytes. */
function checkVerdict(data: Uint8Array, verdict: Verdict): void {
  if (verdict === null || typeof verdict !== "object" || typeof verdict.ok !== "boolean") {
    throw new Error(`not a verdict: ${String(verdict)}`);
  }
  if (!verdict.ok) {
    if (verdict.deferred) throw new Error("deferred, though every key here is inline");
    if (!REASONS.has(verdict.reason) || verdict.reason === "duplicate") {
      throw new Error(`refusal reason ${JSON.stringify(verdict.reason)} is not a §7 per-event reason verifyEvent may give`);
    }
    if (typeof verdict.detail !== "string" || verdict.detail.length === 0) throw new Error("refusal without a detail");
    if (verdict.claimed !== undefined && (typeof verdict.claimed.iss !== "string" || typeof verdict.claimed.jti !== "string")) {
      throw new Error(`claimed is not {iss, jti}: ${JSON.stringify(verdict.claimed)}`);
    }
    return;
  }
  // Accepted: the signed bytes must be exactly what the signer produced, and the signature must verify.
  const token = Buffer.from(data).toString("latin1");
  const dot = token.lastIndexOf(".");
  const signed = signedInputs.get(token.slice(0, dot));
  if (!signed) throw new Error(`accepted a header.payload the signer never produced: ${preview(data)}`);
  const signature = Buffer.from(token.slice(dot + 1), "base64url");
  if (!cryptoVerify(null, Buffer.from(signed.signingInput, "latin1"), signed.publicKey, signature)) {
    throw new Error(`accepted a signature that does not verify with ${signed.kid}: ${preview(data)}`);
  }
  if (token !== signed.token) throw new Error(`accepted look-alike bytes of a signed token: ${preview(data)}`);
  if (Buffer.from(verdict.event.bytes).toString("latin1") !== token) throw new Error("the verified token is not the bytes received");
  if (verdict.event.key.kid !== signed.kid) throw new Error(`verified with ${verdict.event.key.kid}, signed with ${signed.kid}`);
}

async function verifyChecked(data: Uint8Array, subject: string): Promise<Verdict> {
  let verdict: Verdict;
  try {
    verdict = await verifyEvent(data, subject, context());
  } catch (err) {
    throw new Error(`verifyEvent threw ${(err as Error)?.name}: ${(err as Error)?.message} on ${preview(data)}`, { cause: err });
  }
  checkVerdict(data, verdict);
  return verdict;
}

/** fast-check's own report would print megabytes of counterexample: keep the start and the end of it. */
function reporter<T>(details: fc.RunDetails<T>): void {
  if (!details.failed) return;
  const shown = fc.stringify(details.counterexample);
  const example = shown.length <= 2000 ? shown : `${shown.slice(0, 1500)} …(${shown.length - 1900} characters)… ${shown.slice(-400)}`;
  const cause = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
  throw new Error(
    `property failed after ${details.numRuns} cases (seed ${details.seed}, path "${details.counterexamplePath}", shrunk ${details.numShrinks} times)\n` +
      `cause: ${cause}\ncounterexample: ${example}`,
    { cause: details.errorInstance },
  );
}

const subjectArb = fc.oneof(
  { weight: 12, arbitrary: fc.constant("own") },
  { weight: 1, arbitrary: fc.constantFrom(FROM_ALPHA, FROM_GAMMA, FROM_DELTA, inboxSubject(GAMMA, ALPHA), "fedrelay.v1.inbox.beta_example_org", "") },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 40 }) },
);

const subjectFor = (choice: string, original: Signed): string => (choice === "own" ? original.subject : choice);

// An independent reading of DESIGN §3 and §5, for events that pass.
const HOMESERVER_RE = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;
const isName = (v: unknown): v is string => typeof v === "string" && v.length <= 253 && HOMESERVER_RE.test(v);
const isSeconds = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v >= 0;

/**
 * Whether some object in the JSON text names a member twice: a token-by-token
 * reading of RFC 8259 with its own stack (events nest 100,000 deep), independent
 * of src/protocol/strict-json.ts.
 */
function repeatsAMember(text: string): boolean {
  // Per open container: the names an object has had, and whether a name comes next; null for an array.
  const stack: ({ names: Set<string>; nameNext: boolean } | null)[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === '"') {
      const start = i;
      i++;
      while (text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
      i++;
      const top = stack.at(-1);
      if (top && top.nameNext) {
        const name = JSON.parse(text.slice(start, i)) as string;
        if (top.names.has(name)) return true;
        top.names.add(name);
        top.nameNext = false;
      }
      continue;
    }
    if (c === "{") stack.push({ names: new Set(), nameNext: true });
    else if (c === "[") stack.push(null);
    else if (c === "}" || c === "]") stack.pop();
    else if (c === ",") {
      const top = stack.at(-1);
      if (top) top.nameNext = true;
    }
    i++;
  }
  return false;
}

/** Why an accepted event breaks DESIGN §5, or undefined. */
function designViolation(headerText: string, payloadText: string, subject: string): string | undefined {
  if (repeatsAMember(headerText) || repeatsAMember(payloadText)) return "a member named twice";
  const h = JSON.parse(headerText) as Record<string, unknown>;
  const p = JSON.parse(payloadText) as Record<string, unknown>;
  const extra = Object.keys(h).filter((k) => !["alg", "kid", "typ"].includes(k));
  if (extra.length > 0) return `header members ${JSON.stringify(extra)}`;
  if (h.alg !== "EdDSA" || h.typ !== EVENT_TYP) return "alg/typ";
  if (!isName(p.iss) || !isName(p.aud)) return "iss/aud are not names";
  if (typeof h.kid !== "string" || !h.kid.startsWith(`${p.iss}#`)) return "kid does not name iss";
  if (p.aud !== BETA) return "aud is not this homeserver";
  // The destination token is the stream's business (it only holds subjects for this homeserver); step 4 checks the sender's.
  const tokens = subject.split(".");
  if (tokens.length !== 5 || tokens.slice(0, 3).join(".") !== "fedrelay.v1.inbox" || tokens[4] !== p.iss.replaceAll(".", "_")) {
    return "not on the sender's own subject";
  }
  if (typeof p.jti !== "string" || !/^[A-Za-z0-9_-]{1,64}$/.test(p.jti)) return "jti";
  if (!isSeconds(p.iat) || !isSeconds(p.exp)) return "iat/exp are not whole seconds";
  if (p.iat > NOW + 300 || p.exp <= NOW || p.exp - p.iat > 7 * DAY) return "time window";
  if (typeof p.grp !== "string") return "grp";
  const at = p.grp.lastIndexOf("@");
  if (!/^[A-Za-z0-9._~-]{1,128}$/.test(p.grp.slice(0, at)) || p.grp.slice(at + 1) !== p.iss) return "grp owner";
  if (!Array.isArray(p.rcpt) || p.rcpt.length < 1 || p.rcpt.length > 1000) return "rcpt count";
  const cids = new Set<string>();
  for (const r of p.rcpt as unknown[]) {
    if (r === null || typeof r !== "object" || Array.isArray(r)) return "rcpt entry";
    const { cid, cap } = r as Record<string, unknown>;
    if (typeof cid !== "string" || !/^[A-Za-z0-9._~:@/-]{1,255}$/.test(cid) || cids.has(cid)) return `cid ${JSON.stringify(cid)}`;
    cids.add(cid);
    if (cap !== undefined && (typeof cap !== "string" || cap.length === 0)) return "cap";
  }
  if (typeof p.body !== "string" || !/^[A-Za-z0-9_-]*$/.test(p.body)) return "body alphabet";
  const decoded = Buffer.from(p.body, "base64url");
  if (decoded.toString("base64url") !== p.body) return "body not canonical";
  if (decoded.length > 64 * 1024) return "body over 64 KiB";
  if (p.ctype !== undefined && (typeof p.ctype !== "string" || p.ctype.length === 0)) return "ctype";
  if (p.seq !== undefined && (!isSeconds(p.seq) || p.seq > Number.MAX_SAFE_INTEGER)) return "seq";
  return undefined;
}

// ---------------------------------------------------------------------------

describe("verifyEvent on mutated events (property-based)", () => {
  it("the pool is what it claims: each original verifies as signed, most of them accepted", async () => {
    let accepted = 0;
    for (const original of pool) {
      const verdict = await verifyChecked(Buffer.from(original.token, "latin1"), original.subject);
      if (verdict.ok) accepted++;
    }
    expect(pool.length).toBeGreaterThanOrEqual(24);
    expect(accepted).toBe(18);
    expect(unhandled).toEqual([]);
  });

  it(`never throws, refuses with a §7 reason, and accepts only bytes the signer produced (${RUNS.mutated} cases)`, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.nat(),
        fc.array(mutationArb, { minLength: 1, maxLength: 3 }),
        subjectArb,
        async (which, mutations, subjectChoice) => {
          const original = pool[which % pool.length]!;
          const data = mutations.reduce(mutate, Buffer.from(original.token, "latin1"));
          await verifyChecked(data, subjectFor(subjectChoice, original));
        },
      ),
      { numRuns: RUNS.mutated, reporter },
    );
    expect(unhandled).toEqual([]);
  });

  it(`re-signed mutations: never throws, and whatever passes conforms to DESIGN §5 (${RUNS.resigned} cases)`, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.nat(),
        fc.array(fc.oneof(fc.record({ part: fc.constantFrom<0 | 1>(0, 1), edit: jsonEditArb }), plausibleEdit), { minLength: 1, maxLength: 3 }),
        subjectArb,
        async (which, edits, subjectChoice) => {
          const original = pool[which % pool.length]!;
          const texts = original.signingInput.split(".").map((p) => Buffer.from(p, "base64url").toString("utf8"));
          for (const { part, edit } of edits) texts[part] = editJson(texts[part]!, edit);
          const key = original.kid.startsWith(GAMMA) ? gammaKey : original.kid === alphaUnpublished.kid ? alphaUnpublished : alphaKey;
          const subject = subjectFor(subjectChoice, original);
          const known = signedInputs.has(`${b64(texts[0]!)}.${b64(texts[1]!)}`);
          const signed = signText(texts[0]!, texts[1]!, key, subject);
          try {
            const verdict = await verifyChecked(Buffer.from(signed.token, "latin1"), subject);
            if (verdict.ok) {
              const violation = designViolation(texts[0]!, texts[1]!, subject);
              if (violation) throw new Error(`accepted an event that breaks DESIGN §5 (${violation}): ${preview(Buffer.from(signed.token))}`);
              const payload = JSON.parse(texts[1]!) as Record<string, unknown>;
              for (const name of ["iss", "aud", "jti", "iat", "exp", "grp", "ctype", "seq"] as const) {
                if (!Object.is(verdict.event.claims[name], payload[name])) throw new Error(`claim ${name} is not what was signed`);
              }
              // The body is not carried beside the bytes: it is read from them (they are the signed token).
              if ("body" in verdict.event.claims) throw new Error("the verified claims carry the body");
              if (Buffer.from(verdict.event.bytes).toString("latin1") !== signed.token) throw new Error("the verified bytes are not the token");
            }
          } finally {
            if (!known) signedInputs.delete(signed.signingInput);
          }
        },
      ),
      { numRuns: RUNS.resigned, reporter },
    );
    expect(unhandled).toEqual([]);
  });

  it(`any garbage as bytes never crashes and is never accepted (${RUNS.garbage} cases)`, async () => {
    const jsonPart = fc.oneof(fc.json(), fc.jsonValue().map((v) => JSON.stringify(v)), fc.string({ unit: "binary" })).map((t) => b64(t));
    const garbage = fc.oneof(
      fc.uint8Array({ maxLength: 2048 }),
      fc.string({ unit: "binary" }).map((s) => Buffer.from(s, "utf8")),
      fc.string({ unit: "binary" }).map((s) => Buffer.from(s, "latin1")),
      fc.json().map((s) => Buffer.from(s, "utf8")),
      fc.tuple(jsonPart, jsonPart, fc.uint8Array({ maxLength: 96 })).map(([h, p, s]) => Buffer.from(`${h}.${p}.${Buffer.from(s).toString("base64url")}`, "latin1")),
      fc.tuple(fc.dictionary(nameArb, fc.jsonValue(), { maxKeys: 5 }), fc.dictionary(nameArb, fc.jsonValue(), { maxKeys: 8 }), fc.uint8Array({ minLength: 64, maxLength: 64 }))
        .map(([h, p, s]) => Buffer.from(`${b64(JSON.stringify({ alg: "EdDSA", kid: alphaKey.kid, typ: EVENT_TYP, ...h }))}.${b64(JSON.stringify({ ...claims(), ...p }))}.${Buffer.from(s).toString("base64url")}`, "latin1")),
    );
    await fc.assert(
      fc.asyncProperty(garbage, subjectArb, async (data, subjectChoice) => {
        const verdict = await verifyChecked(data, subjectChoice === "own" ? FROM_ALPHA : subjectChoice);
        if (verdict.ok) throw new Error(`accepted garbage: ${preview(data)}`);
      }),
      { numRuns: RUNS.garbage, reporter },
    );
    expect(unhandled).toEqual([]);
  });
});

describe("regressions found by the properties above", () => {
  // Shrunk counterexample of the main property: {"kind":"json","part":0,"edit":{"op":"set","name":"alg",
  // "value":"{\"a\":{\"a\":…1…}}"}} on pool[0]. JSON.parse reads any depth, but the refusal's detail is built
  // with JSON.stringify(header.alg), which recurses and throws RangeError past a few thousand levels.
  const deep = (n: number): string => `${"[".repeat(n)}${"]".repeat(n)}`;
  const withHeader = (edit: (h: Record<string, string>) => string): Buffer => {
    const [, payload, signature] = pool[0]!.token.split(".");
    return Buffer.from(`${b64(edit({ alg: json("EdDSA"), kid: json(alphaKey.kid), typ: json(EVENT_TYP) }))}.${payload!}.${signature!}`, "latin1");
  };
  const headerWith = (name: string, value: string) => (h: Record<string, string>): string =>
    objectText(Object.entries({ ...h, [name]: value }).map(([k, v]) => [json(k), v]));

  for (const [name, reasons] of [["alg", ["bad_alg", "malformed"]], ["typ", ["bad_typ", "malformed"]], ["kid", ["unknown_key", "malformed"]]] as const) {
    it(`refuses a header "${name}" nested 100,000 deep (${reasons.join(" or ")}) instead of throwing RangeError`, async () => {
      const data = withHeader(headerWith(name, deep(100_000)));
      expect(data.length).toBeLessThan(DEFAULT_EVENT_LIMITS.maxMessageBytes);
      const verdict = await verifyEvent(data, FROM_ALPHA, context()).catch((err: unknown) => err);
      expect(verdict).not.toBeInstanceOf(Error);
      checkVerdict(data, verdict as Verdict);
      expect((verdict as Verdict).ok).toBe(false);
      expect(reasons).toContain((verdict as Verdict & { ok: false; deferred?: undefined }).reason);
    });
  }
});
