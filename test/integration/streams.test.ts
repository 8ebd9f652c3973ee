/**
 * The inbox repairs itself or says why it can't (issue 14): a stream or
 * consumer changed or deleted under a running relay is put back where the relay
 * may, and otherwise /readyz says what is wrong; a tampered stream never stops
 * a relay from starting.
 */
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { connect, nanos, type NatsConnection } from "@nats-io/transport-node";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { createRelay } from "../../src/relay.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { inboxConsumerName, inboxSpec } from "../../src/transport/streams.ts";
import { testSchema } from "../helpers/db.ts";
import { eventually, homeserverConfig, identity, SERVICE_TOKEN, signed, type Identity } from "../helpers/federation.ts";

let nats: LocalNats;
let nc: NatsConnection;
let jsm: JetStreamManager;
let alpha: Identity;
const silent = pino({ level: "silent" });
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(async () => {
  nats = await startLocalNats();
  nc = await connect({ servers: nats.url });
  jsm = await jetstreamManager(nc);
  alpha = await identity("alpha");
});

afterAll(async () => {
  for (const fn of cleanup.reverse()) await fn();
  await nc?.close();
  await nats?.stop();
});

async function startBeta(label: string, overrides: Record<string, unknown> = {}, name = "beta") {
  const id = await identity(name);
  const db = testSchema(label);
  const config = homeserverConfig(id, db, {
    natsUrl: nats.url, peers: [alpha],
    overrides: { nats: { servers: [nats.url], checkIntervalSeconds: 1 }, ...overrides },
  });
  const relay = createRelay(config, { api: true, worker: true }, { log: silent });
  cleanup.push(() => db.drop(), () => relay.close());
  await relay.start();
  return { id, db, config, relay };
}

async function readyz(url: string): Promise<{ status: number; body: { checks: Record<string, boolean>; problems?: string[] } }> {
  const res = await fetch(`${url}/readyz`, { headers: { authorization: `Bearer ${SERVICE_TOKEN}` } });
  return { status: res.status, body: await res.json() as { checks: Record<string, boolean>; problems?: string[] } };
}

async function countEvents(relay: ReturnType<typeof createRelay>): Promise<number> {
  const row = await relay.db.kysely.selectFrom("events").select((eb) => eb.fn.countAll<string>().as("n")).executeTakeFirstOrThrow();
  return Number(row.n);
}

async function send(to: string, n: number): Promise<void> {
  const js = jetstream(nc);
  for (let i = 0; i < n; i++) {
    const { token } = await signed(alpha, to, [{ cid: "nobody" }]);
    await publishEvent(js, inboxSubject(to, "alpha"), Buffer.from(token, "latin1"), 5000);
  }
}

describe("a relay that manages its streams puts them back", () => {
  it("restores a tampered inbox (max_age, a republish, a smaller quota) and recreates a deleted consumer, while events keep arriving", async () => {
    const beta = await startBeta("streams_repair", {}, "beta-repair");
    const name = inboxStreamName("beta-repair");
    const before = (await jsm.streams.info(name)).config;
    await jsm.streams.update(name, { max_age: nanos(3_600_000), republish: { src: ">", dest: "stolen.>" }, max_msgs_per_subject: 3 });
    await eventually(async () => {
      const c = (await jsm.streams.info(name)).config;
      return c.max_age === 0 && c.republish === undefined && c.max_msgs_per_subject === before.max_msgs_per_subject;
    }, 10_000, "the inbox restored");
    await jsm.consumers.delete(name, inboxConsumerName(beta.config.worker.consumer, "alpha"));
    await send("beta-repair", 5);
    await eventually(async () => (await countEvents(beta.relay)) === 5, 15_000, "events stored after the consumer was deleted");
    const repairs = (await beta.relay.metrics.streamRepairs.get()).values.find((v) => v.labels.stream === name)?.value ?? 0;
    expect(repairs).toBeGreaterThanOrEqual(2);
    expect((await readyz(beta.relay.url)).status).toBe(200);
  });

  it("starts on an inbox someone changed, and restores it", async () => {
    const settings = homeserverConfig(await identity("beta-tampered"), testSchema("unused"), { natsUrl: nats.url, peers: [] });
    const spec = inboxSpec("beta-tampered", { ...settings.inbox, maxMessageBytes: settings.limits.maxMessageBytes }, settings.worker, ["beta-tampered"]);
    await jsm.streams.add({ ...spec.stream, max_age: nanos(3_600_000) });
    await jsm.consumers.add(spec.stream.name, spec.consumers[0]!);
    const beta = await startBeta("streams_tampered_start", {}, "beta-tampered");
    expect((await jsm.streams.info(spec.stream.name)).config.max_age).toBe(0);
    expect((await readyz(beta.relay.url)).status).toBe(200);
  });
});

describe("a relay that may not manage its streams says what is wrong", () => {
  it("/readyz turns 503 naming the changed field, and 200 again once it is put back; nothing is changed by the relay", async () => {
    // A managing relay creates the streams, as a hub's provisioning would; then one that may not runs on them.
    const beta = await startBeta("streams_unmanaged", {}, "beta-hub");
    await beta.relay.close();
    const name = inboxStreamName("beta-hub");
    const config = { ...beta.config, nats: { ...beta.config.nats, manageStreams: false } };
    const watcher = createRelay(config, { api: false, worker: true }, { log: silent });
    cleanup.push(() => watcher.close());
    await watcher.start();
    expect((await readyz(watcher.url)).status).toBe(200);
    await jsm.streams.update(name, { max_age: nanos(3_600_000) });
    const red = await eventually(async () => {
      const r = await readyz(watcher.url);
      return r.status === 503 && r;
    }, 10_000, "/readyz 503");
    expect(red.body.checks.streams).toBe(false);
    expect(red.body.problems?.join(" ")).toMatch(/FEDRELAY_IN_beta-hub differs: max_age: 3600000000000 \(expected 0\)/);
    expect((await jsm.streams.info(name)).config.max_age).toBe(3_600_000_000_000);
    await jsm.streams.update(name, { max_age: 0 });
    await eventually(async () => (await readyz(watcher.url)).status === 200, 10_000, "/readyz 200 again");
  });

  it("refuses to start, in one line naming it, when its consumer is missing and it may not create it", async () => {
    const beta = await startBeta("streams_missing", {}, "beta-missing");
    await beta.relay.close();
    await jsm.consumers.delete(inboxStreamName("beta-missing"), inboxConsumerName(beta.config.worker.consumer, "alpha"));
    const config = { ...beta.config, nats: { ...beta.config.nats, manageStreams: false } };
    const relay = createRelay(config, { api: false, worker: true }, { log: silent });
    cleanup.push(() => relay.close());
    await expect(relay.start()).rejects.toThrow(/consumer FEDRELAY_IN_beta-missing\/receiver_alpha is missing.*nats-provision/);
  });
});
