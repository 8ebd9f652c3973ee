import { createHmac } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { signEvent, signToken } from "../../src/protocol/sign.ts";
import { EVENT_TYP, type EventClaims } from "../../src/protocol/claims.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { importSigningKey } from "../../src/protocol/keys.ts";
import { verifyEvent } from "../../src/protocol/verify.ts";
import { createKeyRegistry } from "../../src/keys/registry.ts";
import { commitBatch } from "../../src/receive/commit.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import {
  addClient, eventClaims, eventually, grantCapability, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient, type TestHomeserver,
} from "../helpers/federation.ts";

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity, beta: Identity, gamma: Identity;
let alphaHs: TestHomeserver, betaHs: TestHomeserver;

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  [alpha, beta, gamma] = await Promise.all([identity("alpha"), identity("beta"), identity("gamma")]);
  alphaHs = await startHomeserver(alpha, { natsUrl: nats.url, peers: [beta, gamma] });
  betaHs = await startHomeserver(beta, { natsUrl: nats.url, peers: [alpha, gamma] });
});

afterAll(async () => {
  await alphaHs?.close();
  await betaHs?.close();
  await client?.close();
  await nats?.stop();
});

async function messagesOf(hs: TestHomeserver, token: string, query = "") {
  const res = await http(`${hs.relay.url}/v1/messages${query}`, { token });
  expect(res.status).toBe(200);
  return res.json.messages as { cursor: number; from: string; group: string; event: string; body: string; seq?: number }[];
}

async function deliveriesFor(hs: TestHomeserver, clientId: string): Promise<number> {
  const row = await hs.relay.db.kysely.selectFrom("deliveries").select((eb) => eb.fn.countAll<string>().as("n"))
    .where("client_id", "=", clientId).executeTakeFirstOrThrow();
  return Number(row.n);
}

async function publishTo(dest: string, sender: string, token: string): Promise<number> {
  return (await publishEvent(client.js, inboxSubject(dest, sender), Buffer.from(token, "latin1"), 5000)).seq;
}

describe("delivery from the owner to a client of another homeserver", () => {
  it("a fan-out from alpha reaches beta's clients, which pick it up over HTTP and acknowledge it", async () => {
    const bobToken = await addClient(betaHs, "bob");
    const bartToken = await addClient(betaHs, "bart");
    const bobCap = await grantCapability(betaHs, "bob", "climbing@alpha");
    const bartCap = await grantCapability(betaHs, "bart", "climbing@alpha");
    const res = await http(`${alphaHs.relay.url}/v1/fanout`, {
      method: "POST", token: SERVICE_TOKEN,
      body: {
        group: "climbing@alpha", body: Buffer.from("belay on?").toString("base64url"), ctype: "text/plain", seq: 7,
        recipients: [{ server: "beta", client: "bob", capability: bobCap }, { server: "beta", client: "bart", capability: bartCap }],
      },
    });
    expect(res.status).toBe(200);
    expect(res.json.events).toEqual([{ server: "beta", event: res.json.id, recipients: 2, published: true, duplicate: false }]);

    const waited = await http(`${betaHs.relay.url}/v1/messages?wait=10`, { token: bobToken });
    const [message] = waited.json.messages as Record<string, unknown>[];
    expect(message).toMatchObject({ from: "alpha", group: "climbing@alpha", event: res.json.id, ctype: "text/plain", seq: 7 });
    expect(Buffer.from(message!.body as string, "base64url").toString()).toBe("belay on?");

    const ack = await http(`${betaHs.relay.url}/v1/messages/ack`, { method: "POST", token: bobToken, body: { through: message!.cursor } });
    expect(ack).toEqual({ status: 200, json: { acked: message!.cursor } });
    expect(await messagesOf(betaHs, bobToken)).toEqual([]);
    // bart's copy is his own: bob's acknowledgement does not touch it.
    expect(await messagesOf(betaHs, bartToken)).toHaveLength(1);
  });

  it("the same event published twice, byte for byte or re-signed, is stored once", async () => {
    const token = await addClient(betaHs, "carol");
    const cap = await grantCapability(betaHs, "carol", "g@alpha");
    const first = await signed(alpha, "beta", [{ cid: "carol", cap }]);
    const seq1 = await publishTo("beta", "alpha", first.token);
    // Cursors follow commit order: the first is committed before anything else is sent.
    await eventually(async () => (await messagesOf(betaHs, token)).length === 1);
    const again = await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(first.token), 5000);
    // JetStream drops identical bytes by their content hash...
    expect(again).toEqual({ seq: seq1, duplicate: true });
    // ...and Postgres drops a re-signed copy (new bytes, same iss and jti).
    const resigned = await signEvent({ ...first.claims, iat: first.claims.iat - 1 }, alpha.key);
    await publishTo("beta", "alpha", resigned);
    const marker = await signed(alpha, "beta", [{ cid: "carol", cap }]);
    await publishTo("beta", "alpha", marker.token);

    const messages = await eventually(async () => {
      const m = await messagesOf(betaHs, token);
      return m.length >= 2 && m;
    });
    expect(messages.map((m) => m.event)).toEqual([first.claims.jti, marker.claims.jti]);
    expect(await deliveriesFor(betaHs, "carol")).toBe(2);
  });

  it("an event committed by a worker that died before acknowledging is redelivered and not stored again", async () => {
    const gammaHs = await startHomeserver(gamma, { natsUrl: nats.url, peers: [alpha], roles: { api: true, worker: false } });
    try {
      const token = await addClient(gammaHs, "gina");
      const event = await signed(alpha, "gamma", [{ cid: "gina", cap: await grantCapability(gammaHs, "gina", "g@alpha") }]);
      const publishedAt = Date.now() / 1000;
      const seq = await publishTo("gamma", "alpha", event.token);
      // The dead worker's commit: the event is in Postgres, its message still unacknowledged in the stream.
      const keys = createKeyRegistry({ self: { homeserver: "gamma", keys: [] }, peers: { alpha: { keys: [alpha.publicJwk] } } });
      await keys.ready;
      const verdict = await verifyEvent(Buffer.from(event.token), inboxSubject("gamma", "alpha"), {
        self: "gamma", limits: gammaHs.config.limits, keys, isSenderAllowed: () => true, now: Date.now() / 1000,
      });
      if (!verdict.ok) throw new Error(verdict.detail);
      await commitBatch(gammaHs.relay.db, [{ streamSeq: seq, event: verdict.event }], [], { now: Date.now() / 1000, rateLimits: gammaHs.config.rateLimits });

      const { createRelay } = await import("../../src/relay.ts");
      const { pino } = await import("pino");
      const worker = createRelay(gammaHs.config, { api: false, worker: true }, { log: pino({ level: "silent" }) });
      // The event waits in the stream a while before any worker runs.
      await new Promise((resolve) => setTimeout(resolve, 300));
      const startedAt = Date.now() / 1000;
      await worker.start();
      try {
        const jsm = await (await import("@nats-io/jetstream")).jetstreamManager(client.nc);
        // Work-queue retention: the redelivered message disappears once acknowledged.
        await eventually(async () => (await jsm.streams.info(inboxStreamName("gamma"))).state.messages === 0, 15_000, "ack");
        expect(await worker.metrics.eventsRefused.get()).toMatchObject({ values: [{ labels: { reason: "duplicate" }, value: 1 }] });
        // One batch, whose event had waited in the stream since before this worker started.
        const age = (await worker.metrics.batchAgeSeconds.get()).values;
        expect(age.find((v) => v.metricName === "fedrelay_batch_age_seconds_count")?.value).toBe(1);
        const waited = age.find((v) => v.metricName === "fedrelay_batch_age_seconds_sum")!.value;
        expect(startedAt - publishedAt).toBeGreaterThan(0.3);
        expect(waited).toBeGreaterThanOrEqual(startedAt - publishedAt - 0.05);
        expect(waited).toBeLessThan(Date.now() / 1000 - publishedAt + 0.05);
      } finally {
        await worker.close();
      }
      expect(await messagesOf(gammaHs, token)).toHaveLength(1);
      expect(await deliveriesFor(gammaHs, "gina")).toBe(1);
    } finally {
      await gammaHs.close();
    }
  });

  it("accepts the recipients with a capability and refuses one without as no_capability", async () => {
    const token = await addClient(betaHs, "dave");
    const event = await signed(alpha, "beta", [{ cid: "dave", cap: await grantCapability(betaHs, "dave", "g@alpha") }, { cid: "nobody-here" }]);
    await publishTo("beta", "alpha", event.token);
    await eventually(async () => (await messagesOf(betaHs, token)).length === 1);
    const refusals = await betaHs.relay.db.kysely.selectFrom("all_recipient_refusals").select(["client_id", "reason"])
      .where("jti", "=", event.claims.jti).execute();
    expect(refusals).toEqual([{ client_id: "nobody-here", reason: "no_capability" }]);
  });
});

describe("forged events never reach Postgres", () => {
  const b64 = (v: unknown) => Buffer.from(JSON.stringify(v)).toString("base64url");

  async function forgeries(): Promise<{ name: string; subject: [string, string]; token: string; reason: string }[]> {
    const base = (extra: Partial<EventClaims> = {}) => eventClaims(alpha, "beta", [{ cid: "bob" }], extra);
    const now = Math.floor(Date.now() / 1000);
    const hs256 = (() => {
      const head = b64({ alg: "HS256", kid: alpha.key.kid, typ: EVENT_TYP });
      const body = b64(base());
      const mac = createHmac("sha256", Buffer.from(alpha.jwk.x, "base64url")).update(`${head}.${body}`).digest("base64url");
      return `${head}.${body}.${mac}`;
    })();
    const valid = await signEvent(base(), alpha.key);
    const [h, p, s] = valid.split(".");
    return [
      { name: "alg none", subject: ["beta", "alpha"], token: `${b64({ alg: "none", kid: alpha.key.kid, typ: EVENT_TYP })}.${b64(base())}.`, reason: "bad_alg" },
      { name: "HS256 keyed with alpha's public key", subject: ["beta", "alpha"], token: hs256, reason: "bad_alg" },
      { name: "kid of another homeserver", subject: ["beta", "alpha"], token: await signToken(base(), EVENT_TYP, importSigningKey({ ...gamma.jwk })), reason: "unknown_key" },
      { name: "gamma's valid signature under alpha's kid", subject: ["beta", "alpha"], token: await signEvent(base(), importSigningKey({ ...gamma.jwk, kid: alpha.key.kid })), reason: "bad_signature" },
      { name: "alpha's event on gamma's subject", subject: ["beta", "gamma"], token: await signEvent(base(), alpha.key), reason: "subject_mismatch" },
      { name: "gamma's event for alpha's group", subject: ["beta", "gamma"], token: await signEvent({ ...eventClaims(gamma, "beta", [{ cid: "bob" }]), grp: "g@alpha" }, gamma.key), reason: "not_group_owner" },
      { name: "addressed to gamma", subject: ["beta", "alpha"], token: await signEvent(base({ aud: "gamma" }), alpha.key), reason: "wrong_audience" },
      { name: "expired", subject: ["beta", "alpha"], token: await signEvent(base({ iat: now - 3000, exp: now - 60 }), alpha.key), reason: "expired" },
      { name: "issued in the future", subject: ["beta", "alpha"], token: await signEvent(base({ iat: now + 3600, exp: now + 7200 }), alpha.key), reason: "not_yet_valid" },
      { name: "lifetime over 7 days", subject: ["beta", "alpha"], token: await signEvent(base({ exp: now + 8 * 86400 }), alpha.key), reason: "lifetime_too_long" },
      { name: "body over 64 KiB", subject: ["beta", "alpha"], token: await signEvent(base({ body: Buffer.alloc(65 * 1024).toString("base64url") }), alpha.key), reason: "too_large" },
      { name: "padded base64url", subject: ["beta", "alpha"], token: `${h}.${p}=.${s}`, reason: "malformed" },
      { name: "tampered payload", subject: ["beta", "alpha"], token: `${h}.${b64({ ...JSON.parse(Buffer.from(p!, "base64url").toString()), rcpt: [{ cid: "carol" }] })}.${s}`, reason: "bad_signature" },
      { name: "unknown sender", subject: ["beta", "delta"], token: await signEvent({ ...eventClaims(alpha, "beta", [{ cid: "bob" }]), iss: "delta", grp: "g@delta" }, importSigningKey({ ...alpha.jwk, kid: "delta#k1" })), reason: "unknown_sender" },
    ];
  }

  it("refuses each kind of forgery with its reason and stores none of them", async () => {
    const cases = await forgeries();
    const seqs = new Map<number, (typeof cases)[number]>();
    for (const c of cases) seqs.set(await publishTo(c.subject[0], c.subject[1], c.token), c);

    const rows = await eventually(async () => {
      const r = await betaHs.relay.db.kysely.selectFrom("refused_events").select(["stream_seq", "reason"])
        .where("stream_seq", "in", [...seqs.keys()].map(String)).execute();
      return r.length === cases.length && r;
    });
    const got = Object.fromEntries(rows.map((r) => [seqs.get(Number(r.stream_seq))!.name, r.reason]));
    expect(got).toEqual(Object.fromEntries(cases.map((c) => [c.name, c.reason])));

    const stored = await betaHs.relay.db.kysely.selectFrom("events").select("stream_seq")
      .where("stream_seq", "in", [...seqs.keys()].map(String)).execute();
    expect(stored).toEqual([]);
  });

  it("a forgery reusing a genuine jti does not make the genuine event a duplicate", async () => {
    const token = await addClient(betaHs, "erin");
    const genuine = await signed(alpha, "beta", [{ cid: "erin", cap: await grantCapability(betaHs, "erin", "g@alpha") }]);
    const forged = await signEvent(genuine.claims, importSigningKey({ ...gamma.jwk, kid: alpha.key.kid }));
    await publishTo("beta", "alpha", forged);
    await publishTo("beta", "alpha", genuine.token);
    const messages = await eventually(async () => { const m = await messagesOf(betaHs, token); return m.length > 0 && m; });
    expect(messages.map((m) => m.event)).toEqual([genuine.claims.jti]);
  });
});
