/**
 * Senders are served in turn (issue 15): each has an inbox consumer of its own,
 * and a worker's batches take from them one message each in turn, so one
 * peer's backlog never stands in front of another peer's events. A sender
 * nobody configured is still drained (its events refused), and a consumer
 * that is not the relay's (an older relay's unfiltered one) is removed.
 */
import { AckPolicy, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureInbox, inboxConsumerName } from "../../src/transport/streams.ts";
import { eventually, identity, natsClient, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { metricValue } from "../helpers/metrics.ts";

const NO_THROTTLE = { enabled: false };

let nats: LocalNats;
let client: NatsClient;
let jsm: JetStreamManager;
let alpha: Identity;
let gamma: Identity;
const cleanup: (() => Promise<void>)[] = [];

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  jsm = await jetstreamManager(client.nc);
  [alpha, gamma] = await Promise.all([identity("alpha"), identity("gamma")]);
});

afterAll(async () => {
  for (const c of cleanup.reverse()) await c();
  await client?.close();
  await nats?.stop();
});

async function publish(from: Identity, to: string, jtis: readonly string[]): Promise<void> {
  for (let i = 0; i < jtis.length; i += 200) {
    await Promise.all(jtis.slice(i, i + 200).map(async (jti) => {
      const { token } = await signed(from, to, [{ cid: "nobody" }], { jti });
      await publishEvent(client.js, inboxSubject(to, from.name), Buffer.from(token, "latin1"), 10_000);
    }));
  }
}

async function start(name: string, peers: Identity[], overrides: Record<string, unknown> = {}): Promise<TestHomeserver> {
  const hs = await startHomeserver(await identity(name), { natsUrl: nats.url, peers, overrides: { rateLimits: NO_THROTTLE, ...overrides } });
  cleanup.push(() => hs.close());
  return hs;
}

const stored = async (hs: TestHomeserver, iss: string): Promise<number> =>
  Number((await sql<{ n: string }>`SELECT count(*) AS n FROM events WHERE iss = ${iss}`.execute(hs.relay.db.kysely)).rows[0]!.n);

describe("one peer's backlog", () => {
  it("does not stand in front of another peer's events: gamma's 20 are all stored while most of alpha's 5,000 still wait", async () => {
    const settings = loadConfig({ overrides: { homeserver: "beta-fair" } });
    await ensureInbox(jsm, "beta-fair", { ...settings.inbox, maxMessageBytes: settings.limits.maxMessageBytes }, settings.worker, ["beta-fair", "alpha", "gamma"]);
    await publish(alpha, "beta-fair", Array.from({ length: 5000 }, (_, i) => `backlog-${i}`));
    // Small batches, so draining alpha's backlog takes many of them.
    const beta = await start("beta-fair", [alpha, gamma], { worker: { batchSize: 20 } });
    await publish(gamma, "beta-fair", Array.from({ length: 20 }, (_, i) => `honest-${i}`));
    await eventually(async () => (await stored(beta, "gamma")) === 20, 15_000, "gamma's 20 stored");
    const alphaStored = await stored(beta, "alpha");
    // Arrival order would have stored all 5,000 first.
    expect(alphaStored).toBeLessThan(4000);
    await eventually(async () => (await stored(beta, "alpha")) === 5000, 60_000, "alpha's backlog stored");
    // The per-peer view: each peer's events, by name.
    const metrics = await beta.relay.metrics.registry.metrics();
    expect(metricValue(metrics, "fedrelay_events_received_total", { peer: "alpha" })).toBe(5000);
    expect(metricValue(metrics, "fedrelay_events_received_total", { peer: "gamma" })).toBe(20);
    expect(metricValue(metrics, "fedrelay_events_accepted_total", { peer: "gamma" })).toBe(20);
  });
});

describe("senders and consumers", () => {
  it("a sender nobody configured is drained (refused as unknown), by a consumer the server removes once idle", async () => {
    const beta = await start("beta-unlisted", [alpha], { nats: { servers: [nats.url], checkIntervalSeconds: 1 } });
    await publish(gamma, "beta-unlisted", ["stranger-1", "stranger-2", "stranger-3"]);
    await eventually(async () => (await jsm.streams.info(inboxStreamName("beta-unlisted"))).state.messages === 0, 15_000, "the stranger's events drained");
    const refused = await sql<{ reason: string }>`SELECT reason FROM refused_events`.execute(beta.relay.db.kysely);
    expect(refused.rows.map((r) => r.reason)).toEqual(["unknown_sender", "unknown_sender", "unknown_sender"]);
    const consumer = await jsm.consumers.info(inboxStreamName("beta-unlisted"), inboxConsumerName(beta.config.worker.consumer, "gamma"));
    expect(consumer.config.filter_subject).toBe(inboxSubject("beta-unlisted", "gamma"));
    expect(consumer.config.inactive_threshold).toBeGreaterThan(0);
    // Unknown senders are one label, never their own.
    const metrics = await beta.relay.metrics.registry.metrics();
    expect(metricValue(metrics, "fedrelay_events_refused_total", { peer: "other", reason: "unknown_sender" })).toBe(3);
    expect(metrics).not.toContain('peer="gamma"');
  });

  it("an unfiltered consumer on the inbox (an older relay's, or anyone's) is removed, and the events it held are stored", async () => {
    const settings = loadConfig({ overrides: { homeserver: "beta-legacy" } });
    await ensureInbox(jsm, "beta-legacy", { ...settings.inbox, maxMessageBytes: settings.limits.maxMessageBytes }, settings.worker, []);
    await jsm.consumers.add(inboxStreamName("beta-legacy"), { durable_name: "receiver", ack_policy: AckPolicy.Explicit });
    await publish(alpha, "beta-legacy", ["old-1", "old-2"]);
    const beta = await start("beta-legacy", [alpha]);
    await eventually(async () => (await stored(beta, "alpha")) === 2, 15_000, "the two events stored");
    const names: string[] = [];
    for await (const c of jsm.consumers.list(inboxStreamName("beta-legacy"))) names.push(c.name);
    expect(names.sort()).toEqual([inboxConsumerName("receiver", "alpha"), inboxConsumerName("receiver", "beta-legacy")].sort());
  });
});
