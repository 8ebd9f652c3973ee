/**
 * Bad input end to end (issue 5, item 7): mutated events published through a real
 * nats-server to a real worker and Postgres. A smaller cousin of
 * test/unit/verify-fuzz.test.ts (whose mutations are repeated here in brief: test
 * files cannot import one another without running each other's tests).
 *
 * After everything is processed: the worker is still ready; every distinct byte
 * string published is either stored as an event whose token re-verifies with its
 * sender's key (node:crypto), or recorded in refused_events with a §7 reason, or
 * counted as a duplicate of an already stored (iss, jti) (the metric
 * fedrelay_events_refused_total{reason="duplicate"}); nothing else.
 */
import { createHash, createPublicKey, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from "node:crypto";
import { jetstreamManager } from "@nats-io/jetstream";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EVENT_REASONS } from "../../src/errors.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { EVENT_TYP } from "../../src/protocol/claims.ts";
import { inboxStreamName } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import {
  addClient, eventClaims, eventually, grantCapability, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient, type TestHomeserver,
} from "../helpers/federation.ts";
import { metricValue } from "../helpers/metrics.ts";

const CASES = 500;

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity, beta: Identity, gamma: Identity;
let betaHs: TestHomeserver;

/** Every token the test signed: `header.payload` → who signed it and for which (iss, jti). */
interface Original {
  readonly token: string;
  readonly iss: string;
  readonly jti: string;
  readonly sender: string; // subject token of the sender
  readonly publicKey: KeyObject;
}
const originals: Original[] = [];
const bySigningInput = new Map<string, Original>();

function remember(token: string, signer: Identity, jti: string): void {
  const original = { token, iss: signer.name, jti, sender: signer.name, publicKey: createPublicKey(signer.key.privateKey) };
  originals.push(original);
  bySigningInput.set(token.slice(0, token.lastIndexOf(".")), original);
}

const b64 = (text: string, encoding: BufferEncoding = "utf8"): string => Buffer.from(text, encoding).toString("base64url");
const json = (v: unknown): string => JSON.stringify(v);

/** The same claims signed again from hand-built JSON text: other bytes, the same (iss, jti). */
function resignText(signer: Identity, headerText: string, payloadText: string): string {
  const input = `${b64(headerText)}.${b64(payloadText)}`;
  return `${input}.${cryptoSign(null, Buffer.from(input), signer.key.privateKey).toString("base64url")}`;
}

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  [alpha, beta, gamma] = await Promise.all([identity("alpha"), identity("beta"), identity("gamma")]);
  betaHs = await startHomeserver(beta, { natsUrl: nats.url, peers: [alpha, gamma] });
  await addClient(betaHs, "bob");
  await addClient(betaHs, "bart");
  const bobCap = await grantCapability(betaHs, "bob", "g@alpha");
  const bartCap = await grantCapability(betaHs, "bart", "g@alpha");
  const bobGammaCap = await grantCapability(betaHs, "bob", "g@gamma");

  const shapes: { from: Identity; rcpt: { cid: string; cap?: string }[]; extra?: Record<string, unknown> }[] = [
    { from: alpha, rcpt: [{ cid: "bob", cap: bobCap }] },
    { from: alpha, rcpt: [{ cid: "bob", cap: bobCap }, { cid: "bart", cap: bartCap }], extra: { ctype: "text/plain", seq: 7 } },
    { from: alpha, rcpt: [{ cid: "bart", cap: bartCap }, ...Array.from({ length: 30 }, (_, i) => ({ cid: `nobody-${i}` }))], extra: { seq: 0 } },
    { from: alpha, rcpt: [{ cid: "bart", cap: bartCap }], extra: { ctype: "message/mls", body: Buffer.alloc(40_000, 7).toString("base64url") } },
    { from: alpha, rcpt: [{ cid: "bob" }] },
    { from: gamma, rcpt: [{ cid: "bob", cap: bobGammaCap }], extra: { seq: Number.MAX_SAFE_INTEGER } },
  ];
  for (const { from, rcpt, extra } of shapes) {
    const event = await signed(from, "beta", rcpt, extra);
    remember(event.token, from, event.claims.jti);
  }
  // Twins: valid, distinct bytes, an (iss, jti) already used: each must end as a duplicate.
  const twinOf = eventClaims(alpha, "beta", [{ cid: "bob", cap: bobCap }]);
  const first = resignText(alpha, json({ alg: "EdDSA", kid: alpha.key.kid, typ: EVENT_TYP }), json(twinOf));
  const reordered = resignText(alpha, json({ typ: EVENT_TYP, kid: alpha.key.kid, alg: "EdDSA" }), json(Object.fromEntries(Object.entries(twinOf).reverse())));
  const spaced = resignText(alpha, json({ alg: "EdDSA", kid: alpha.key.kid, typ: EVENT_TYP }), JSON.stringify(twinOf, null, 1));
  for (const token of [first, reordered, spaced]) remember(token, alpha, twinOf.jti);
});

afterAll(async () => {
  await betaHs?.close();
  await client?.close();
  await nats?.stop();
});

// ---------------------------------------------------------------------------
// Mutations, in brief (the unit test has the full set).

const EVIL_CHARS = ["\u0000", "\n", "\u007f", "\u00e9", "\u0430", "\u200b", "\u202e", "\ufeff", "\ud800", "\u{1f4a5}", "_", ".", "#", "@", " ", "\"", "\\"];

const valueText: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(
    "9007199254740992", "-0", "1e308", "1e999", "5e-324", "1.5", "123456789012345678901234567890", "NaN", "00", "\"NaN\"", "\"\"",
    "null", "true", "[]", "{}", "[{\"cid\":\"bob\"}]", "[{\"cid\":\"bob\"},{\"cid\":\"bob\"}]", "\"none\"", "\"HS256\"", "\"alpha#k1\"", "\"gamma#k1\"",
    "\"alpha\"", "\"gamma\"", "\"delta\"", "\"beta\"", "\"g@gamma\"", "\"g@alpha\"", "\"\\u0000\"", "\"\\ud800\"",
  ),
  fc.integer({ min: 0, max: 2 ** 31 }).map((n) => String(Math.floor(Date.now() / 1000) + n - 2 ** 30)),
  fc.string({ unit: "binary", maxLength: 24 }).map(json),
  fc.string({ unit: fc.constantFrom(...EVIL_CHARS), maxLength: 4 }).map(json),
  fc.tuple(fc.constantFrom("alpha", "gamma", "bob", "g@alpha", "alpha#k1"), fc.nat(), fc.constantFrom(...EVIL_CHARS))
    .map(([s, i, c]) => json(`${s.slice(0, i % (s.length + 1))}${c}${s.slice(i % (s.length + 1))}`)),
  fc.oneof(fc.constantFrom(87_381, 87_382, 87_383, 1_048_576), fc.integer({ min: 0, max: 1_100_000 })).map((n) => `"${"A".repeat(n)}"`),
  fc.integer({ min: 1, max: 20_000 }).map((n) => `${"[".repeat(n)}${"]".repeat(n)}`),
  fc.json({ maxDepth: 2 }),
);

const nameArb: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom("alg", "kid", "typ", "crit", "jwk", "iss", "aud", "jti", "iat", "exp", "grp", "rcpt", "body", "ctype", "seq"),
  fc.constantFrom("__proto__", "", "\u0000", "alg\u0000", "\u0430lg", "ki\u200bd"),
  fc.string({ unit: "binary", maxLength: 8 }),
);

type Mutation =
  | { readonly kind: "flip"; readonly pos: number; readonly bit: number }
  | { readonly kind: "truncate"; readonly pos: number }
  | { readonly kind: "insert"; readonly pos: number; readonly bytes: Uint8Array }
  | { readonly kind: "delete"; readonly pos: number; readonly len: number }
  | { readonly kind: "parts"; readonly order: readonly number[] }
  | { readonly kind: "transplant"; readonly part: number; readonly from: number }
  | { readonly kind: "set"; readonly part: number; readonly name: string; readonly value: string; readonly duplicate: boolean }
  | { readonly kind: "reorder"; readonly part: number }
  | { readonly kind: "pad"; readonly part: number };

const part = fc.constantFrom(0, 1, 2);
const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("flip" as const), pos: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }) },
  fc.record({ kind: fc.constant("truncate" as const), pos: fc.nat() }),
  fc.record({ kind: fc.constant("insert" as const), pos: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 4 }) }),
  fc.record({ kind: fc.constant("delete" as const), pos: fc.nat(), len: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ kind: fc.constant("parts" as const), order: fc.array(fc.integer({ min: 0, max: 2 }), { maxLength: 5 }) }),
  fc.record({ kind: fc.constant("transplant" as const), part, from: fc.nat() }),
  { weight: 5, arbitrary: fc.record({ kind: fc.constant("set" as const), part: fc.constantFrom(0, 1), name: nameArb, value: valueText, duplicate: fc.boolean() }) },
  fc.record({ kind: fc.constant("reorder" as const), part: fc.constantFrom(0, 1) }),
  fc.record({ kind: fc.constant("pad" as const), part }),
);

function entriesOf(text: string): [string, string][] {
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== "object" || Array.isArray(value)) return [];
    return Object.entries(value).map(([k, v]) => [json(k), json(v) ?? "null"]);
  } catch {
    return [];
  }
}

function mutate(input: Buffer, m: Mutation): Buffer {
  const at = (pos: number): number => pos % (input.length + 1);
  const parts = input.toString("latin1").split(".");
  const join = (): Buffer => Buffer.from(parts.join("."), "latin1");
  switch (m.kind) {
    case "flip": {
      if (input.length === 0) return input;
      const out = Buffer.from(input);
      out[m.pos % out.length] = out[m.pos % out.length]! ^ (1 << m.bit);
      return out;
    }
    case "truncate":
      return input.subarray(0, at(m.pos));
    case "insert":
      return Buffer.concat([input.subarray(0, at(m.pos)), m.bytes, input.subarray(at(m.pos))]);
    case "delete":
      return Buffer.concat([input.subarray(0, at(m.pos)), input.subarray(at(m.pos) + m.len)]);
    case "parts":
      return Buffer.from(m.order.map((i) => parts[i % parts.length]!).join("."), "latin1");
    case "transplant":
      if (parts.length <= m.part) return input;
      parts[m.part] = originals[m.from % originals.length]!.token.split(".")[m.part]!;
      return join();
    case "set":
    case "reorder": {
      if (parts.length <= m.part) return input;
      const entries = entriesOf(Buffer.from(parts[m.part]!, "base64url").toString("utf8"));
      if (m.kind === "reorder") entries.reverse();
      else if (m.duplicate) entries.push([json(m.name), m.value]);
      else {
        const i = entries.findIndex(([k]) => k === json(m.name));
        if (i >= 0) entries[i] = [json(m.name), m.value];
        else entries.push([json(m.name), m.value]);
      }
      parts[m.part] = b64(`{${entries.map(([k, v]) => `${k}:${v}`).join(",")}}`);
      return join();
    }
    case "pad":
      if (parts.length <= m.part) return input;
      parts[m.part] = `${parts[m.part]!}=`;
      return join();
  }
}

// ---------------------------------------------------------------------------

interface Metrics {
  readonly duplicates: number;
  readonly batchFailures: number;
}

/** Operator routes on the API's listener need the service token. */
const OPERATOR = { authorization: `Bearer ${SERVICE_TOKEN}` };

async function scrapeMetrics(): Promise<Metrics> {
  const text = await (await fetch(`${betaHs.relay.url}/metrics`, { headers: OPERATOR })).text();
  return {
    duplicates: metricValue(text, "fedrelay_events_refused_total", { reason: "duplicate" }),
    batchFailures: metricValue(text, "fedrelay_batch_failures_total"),
  };
}

async function tables(): Promise<{ events: { iss: string; jti: string; token: string | null; token_sha256: Buffer | null; stream_seq: string | null }[]; refused: { stream_seq: string; reason: string; detail: string }[] }> {
  const kysely = betaHs.relay.db.kysely;
  const events = await kysely.selectFrom("events").select(["iss", "jti", "token", "token_sha256", "stream_seq"]).execute();
  const refused = await kysely.selectFrom("refused_events").select(["stream_seq", "reason", "detail"]).execute();
  return { events: events.map((e) => ({ ...e, stream_seq: e.stream_seq === null ? null : String(e.stream_seq) })), refused: refused.map((r) => ({ ...r, stream_seq: String(r.stream_seq) })) };
}

function preview(data: Uint8Array): string {
  const text = Buffer.from(data).toString("latin1");
  return text.length <= 160 ? json(text) : `${json(text.slice(0, 160))}… (${text.length} bytes)`;
}

describe("mutated events through NATS, the worker and Postgres (property-based, end to end)", () => {
  it(`${CASES} mutated events: each stored re-verifiable, refused with a §7 reason, or a duplicate; the worker stays ready`, async () => {
    const seed = Date.now() % 2 ** 31;
    const cases = fc.sample(
      fc.tuple(fc.nat(), fc.array(mutationArb, { minLength: 1, maxLength: 3 }), fc.oneof({ weight: 9, arbitrary: fc.constant("own") }, fc.constantFrom("alpha", "gamma", "delta", "ALPHA"))),
      { numRuns: CASES, seed },
    );
    const maxPayload = client.nc.info?.max_payload ?? 1024 * 1024;

    // Distinct byte strings only (JetStream would drop a repeat by its content hash): the originals and twins, then the mutations.
    const toPublish = new Map<string, { data: Buffer; subject: string }>();
    const add = (data: Buffer, sender: string): void => {
      const key = data.toString("base64");
      if (!toPublish.has(key)) toPublish.set(key, { data, subject: `fedrelay.v1.inbox.beta.${sender}` });
    };
    for (const o of originals) add(Buffer.from(o.token, "latin1"), o.sender);
    for (const [which, mutations, sender] of cases) {
      const original = originals[which % originals.length]!;
      add(mutations.reduce(mutate, Buffer.from(original.token, "latin1")), sender === "own" ? original.sender : sender);
    }

    // Over the server's max_payload, a publish is refused before it reaches the stream: not published, counted apart.
    let oversize = 0;
    const published = new Map<number, Buffer>();
    const publishFailures: string[] = [];
    let jetstreamDuplicates = 0;
    const pending = [...toPublish.values()].filter(({ data }) => {
      if (data.length + 1024 <= maxPayload) return true;
      oversize++;
      return false;
    });
    for (let i = 0; i < pending.length; i += 50) {
      await Promise.all(pending.slice(i, i + 50).map(async ({ data, subject }) => {
        try {
          const ack = await publishEvent(client.js, subject, data, 10_000);
          if (ack.duplicate) jetstreamDuplicates++;
          else published.set(ack.seq, data);
        } catch (err) {
          publishFailures.push(`${(err as Error).message} (${preview(data)})`);
        }
      }));
    }
    expect(publishFailures).toEqual([]);
    expect(jetstreamDuplicates).toBe(0);
    expect(published.size + oversize).toBe(toPublish.size);

    // Expected duplicates: validly signed byte strings beyond the first per (iss, jti).
    const validKeys = new Map<string, number>();
    for (const data of published.values()) {
      const token = data.toString("latin1");
      const o = bySigningInput.get(token.slice(0, token.lastIndexOf(".")));
      if (o && o.token === token) validKeys.set(`${o.iss}\u0000${o.jti}`, (validKeys.get(`${o.iss}\u0000${o.jti}`) ?? 0) + 1);
    }
    const expectedDuplicates = [...validKeys.values()].reduce((n, c) => n + c - 1, 0);

    // Wait until every published message is accounted for and the work queue is empty.
    const jsm = await jetstreamManager(client.nc);
    const settled = await eventually(async () => {
      const [{ events, refused }, metrics, info] = await Promise.all([tables(), scrapeMetrics(), jsm.streams.info(inboxStreamName("beta"))]);
      return events.length + refused.length + metrics.duplicates >= published.size && info.state.messages === 0 && { events, refused, metrics };
    }, 45_000, "every published message to be stored, refused or counted as a duplicate").catch(async (err: unknown) => {
      const { events, refused } = await tables();
      const seen = new Set([...events.map((e) => e.stream_seq), ...refused.map((r) => r.stream_seq)]);
      const stored = new Set(events.map((e) => `${e.iss}\u0000${e.jti}`));
      const isDuplicate = (data: Buffer): boolean => {
        const token = data.toString("latin1");
        const o = bySigningInput.get(token.slice(0, token.lastIndexOf(".")));
        return o !== undefined && o.token === token && stored.has(`${o.iss}\u0000${o.jti}`);
      };
      const missing = [...published].filter(([seq, data]) => !seen.has(String(seq)) && !isDuplicate(data));
      throw new Error(
        `${(err as Error).message} (seed ${seed}): ${missing.length} of ${published.size} neither stored, refused nor a duplicate, ` +
          `metrics ${json(await scrapeMetrics())}; first: ` +
          missing.slice(0, 3).map(([seq, data]) => `#${seq} ${preview(data)}`).join("; "),
      );
    });
    const { events, refused, metrics } = settled;

    // The worker did not crash and never failed a batch.
    const ready = await http(`${betaHs.relay.url}/readyz`, { token: SERVICE_TOKEN });
    expect(ready.status, json(ready.json)).toBe(200);
    expect(metrics.batchFailures, `batches failed (seed ${seed})`).toBe(0);

    // Stored: only bytes the test signed, re-verified here with the signer's key.
    const publishedSeqs = new Set([...published.keys()].map(String));
    for (const e of events) {
      expect(publishedSeqs.has(e.stream_seq ?? "")).toBe(true);
      if (e.token === null) {
        // Kept as a record (nobody received it): its hash is of a token the test signed.
        const signed = originals.filter((o) => o.iss === e.iss && o.jti === e.jti).map((o) => createHash("sha256").update(o.token, "latin1").digest("hex"));
        expect(signed, `a record of a token nobody signed (seed ${seed})`).toContain(e.token_sha256?.toString("hex"));
        continue;
      }
      const dot = e.token.lastIndexOf(".");
      const o = bySigningInput.get(e.token.slice(0, dot));
      expect(o, `stored a token nobody signed: ${preview(Buffer.from(e.token, "latin1"))} (seed ${seed})`).toBeDefined();
      expect(e.token).toBe(o!.token);
      expect(cryptoVerify(null, Buffer.from(e.token.slice(0, dot), "latin1"), o!.publicKey, Buffer.from(e.token.slice(dot + 1), "base64url"))).toBe(true);
      expect([e.iss, e.jti]).toEqual([o!.iss, o!.jti]);
    }
    expect(new Set(events.map((e) => `${e.iss}\u0000${e.jti}`))).toEqual(new Set(validKeys.keys()));

    // Refused: a §7 per-event reason, never "duplicate" (duplicates are acknowledged, not recorded).
    for (const r of refused) {
      expect(publishedSeqs.has(r.stream_seq)).toBe(true);
      expect(EVENT_REASONS).toContain(r.reason);
      expect(r.reason).not.toBe("duplicate");
    }

    // Nothing else: distinct published = stored + refused + duplicates.
    expect(metrics.duplicates).toBe(expectedDuplicates);
    expect(events.length + refused.length + metrics.duplicates, `seed ${seed}`).toBe(published.size);
  }, 120_000);
});

describe("regressions found by the property above", () => {
  /**
   * A message whose refusal cannot be recorded fails its whole batch, which is then
   * redelivered forever with everything that shares its batch. `header` replaces the
   * protected header of an otherwise valid event from alpha.
   */
  async function refusedNotRetried(name: string, headerText: string, reasons: readonly string[]): Promise<void> {
    const id = await identity(name);
    const hs = await startHomeserver(id, { natsUrl: nats.url, peers: [alpha] });
    try {
      await addClient(hs, "carol");
      const cap = await grantCapability(hs, "carol", "g@alpha");
      const [, payload, signature] = (await signed(alpha, name, [{ cid: "carol", cap }])).token.split(".");
      const poison = Buffer.from(`${b64(headerText)}.${payload!}.${signature!}`, "latin1");
      const marker = await signed(alpha, name, [{ cid: "carol", cap }]);
      const subject = `fedrelay.v1.inbox.${name}.alpha`;
      const poisonSeq = (await publishEvent(client.js, subject, poison, 5000)).seq;
      await publishEvent(client.js, subject, Buffer.from(marker.token), 5000);

      const failures = async (): Promise<number> => Number(/^fedrelay_batch_failures_total (\d+)$/m.exec(await (await fetch(`${hs.relay.url}/metrics`, { headers: OPERATOR })).text())?.[1] ?? 0);
      const row = await eventually(
        () => hs.relay.db.kysely.selectFrom("refused_events").select(["reason", "detail"]).where("stream_seq", "=", String(poisonSeq)).executeTakeFirst(),
        10_000,
        "the bad event to be recorded as refused",
      ).catch(async (err: unknown) => {
        throw new Error(`${(err as Error).message}: not recorded after ${await failures()} failed batches (${preview(poison)})`);
      });
      expect(reasons).toContain(row.reason);
      // The event that shared its batch is stored too, and nothing failed on the way.
      await eventually(async () => (await hs.relay.db.kysely.selectFrom("events").select("jti").where("jti", "=", marker.claims.jti).executeTakeFirst()) !== undefined, 10_000, "the next event");
      expect(await failures()).toBe(0);
    } finally {
      await hs.close();
    }
  }

  // Shrunk from seed 280686647: the refusal's detail quotes the header member's name verbatim
  // (src/protocol/verify.ts), and Postgres text cannot hold U+0000, so the batch's commit fails.
  it("a header member named U+0000 is refused as malformed and recorded, not retried forever", async () => {
    await refusedNotRetried("nulname", json({ alg: "EdDSA", kid: "alpha#k1", typ: EVENT_TYP, "\u0000": 1 }), ["malformed"]);
  });

  // From test/unit/verify-fuzz.test.ts: JSON.stringify of a deeply nested alg throws RangeError inside verifyEvent.
  it("a header alg nested 100,000 deep is refused and recorded, not retried forever", async () => {
    const deep = `${"[".repeat(100_000)}${"]".repeat(100_000)}`;
    await refusedNotRetried("deepalg", `{"alg":${deep},"kid":"alpha#k1","typ":${json(EVENT_TYP)}}`, ["bad_alg", "malformed"]);
  });
});
