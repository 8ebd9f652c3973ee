/**
 * Availability (issue 5): graceful and forced shutdown, NATS and Postgres
 * outages, and the per-sender backlog quota, against a real nats-server
 * (one per test) and real Postgres (a schema per test). Postgres is taken
 * away from one relay with a TCP proxy, never stopped.
 */
import { Agent as HttpAgent, get as httpGet } from "node:http";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import type { RelayConfig } from "../../src/config.ts";
import { RelayError } from "../../src/errors.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { createRelay, type Relay } from "../../src/relay.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureInbox } from "../../src/transport/streams.ts";
import { testSchema, TEST_DATABASE_URL } from "../helpers/db.ts";
import {
  eventually, homeserverConfig, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient,
} from "../helpers/federation.ts";
import { scrapeMetric } from "../helpers/metrics.ts";
import { startWorkerProcess, writeConfigFile, type WorkerProcess } from "../helpers/processes.ts";
import { startTcpProxy, type TcpProxy } from "../helpers/tcp-proxy.ts";

const CLIENTS = 50;

/** Rate limits far above what these tests send: they are about loss and duplication, not throttling. */
const NO_THROTTLE = {
  client: { rate: 1e6, burst: 1e6 },
  senderClient: { rate: 1e6, burst: 1e6 },
  sender: { rate: 1e6, burst: 1e6 },
};

const cleanups: (() => Promise<unknown>)[] = [];
const later = (fn: () => Promise<unknown>): void => void cleanups.push(fn);

afterEach(async () => {
  for (const fn of cleanups.splice(0).reverse()) await fn().catch(() => undefined);
});

const silent = pino({ level: "silent" });

interface Recipient { readonly cid: string; readonly cap: string }

interface Fixture {
  readonly nats: LocalNats;
  readonly client: NatsClient;
  readonly jsm: JetStreamManager;
  readonly alpha: Identity;
  readonly beta: Identity;
}

async function fixture(natsOptions: { syncAlways?: boolean } = {}): Promise<Fixture> {
  const nats = await startLocalNats(natsOptions);
  later(() => nats.stop());
  const client = await natsClient(nats.url);
  later(() => client.close());
  const [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
  return { nats, client, jsm: await jetstreamManager(client.nc), alpha, beta };
}

/** Registers CLIENTS clients of beta, each with a capability for alpha's group. */
async function grantAll(db: Db): Promise<Recipient[]> {
  const out: Recipient[] = [];
  for (let c = 0; c < CLIENTS; c++) {
    await registerClient(db, `client-${c}`);
    out.push({ cid: `client-${c}`, cap: (await issueCapability(db, `client-${c}`, "g@alpha", "alpha")).capability });
  }
  return out;
}

interface Prepared {
  readonly config: RelayConfig;
  /** A direct connection (never through a proxy) for the test's own queries. */
  readonly db: Db;
  readonly rcpt: Recipient[];
  /** The worker processes' config file. */
  readonly configPath: string;
}

/** Beta's schema, clients and inbox, ready for worker processes (`pgUrl`: where they reach Postgres). */
async function prepareBeta(f: Fixture, label: string, worker: Record<string, unknown>, pgUrl?: string): Promise<Prepared> {
  const schema = testSchema(label);
  later(() => schema.drop());
  const config = homeserverConfig(f.beta, { ...schema, url: pgUrl ?? schema.url }, {
    natsUrl: f.nats.url, peers: [f.alpha],
    overrides: { log: { level: "warn" }, rateLimits: NO_THROTTLE, worker: { retryDelayMs: 100, ...worker } },
  });
  const db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  later(() => db.close());
  await migrate(db.pool, schema.schema);
  await ensureInbox(f.jsm, "beta", { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, ["beta", "alpha"]);
  const rcpt = await grantAll(db);
  const configPath = await writeConfigFile({ ...config, keys: { retired: [] } });
  return { config, db, rcpt, configPath };
}

interface Events { readonly jtis: Set<string>; readonly tokens: Buffer[] }

/** Single-recipient events from alpha to beta, signed ahead of publishing, round-robin over the clients. */
async function presign(alpha: Identity, rcpt: readonly Recipient[], n: number): Promise<Events> {
  const jtis = new Set<string>();
  const tokens: Buffer[] = [];
  for (let i = 0; i < n; i += 200) {
    const chunk = await Promise.all(Array.from({ length: Math.min(200, n - i) }, (_, k) => signed(alpha, "beta", [rcpt[(i + k) % rcpt.length]!])));
    for (const e of chunk) {
      jtis.add(e.claims.jti);
      tokens.push(Buffer.from(e.token));
    }
  }
  return { jtis, tokens };
}

/** Publishes and waits for every JetStream acknowledgement. */
async function publishAll(client: NatsClient, tokens: readonly Buffer[], from = "alpha"): Promise<void> {
  for (let i = 0; i < tokens.length; i += 500) {
    await Promise.all(tokens.slice(i, i + 500).map((t) => publishEvent(client.js, inboxSubject("beta", from), t, 10_000)));
  }
}

async function count(db: Db, table: "events" | "deliveries"): Promise<number> {
  const { n } = await db.kysely.selectFrom(table).select((eb) => eb.fn.countAll<string>().as("n")).executeTakeFirstOrThrow();
  return Number(n);
}

/** Every published event stored once, with its one delivery. */
async function expectExactlyOnce(db: Db, jtis: ReadonlySet<string>): Promise<void> {
  const events = await db.kysely.selectFrom("events").select("jti").execute();
  expect(events).toHaveLength(jtis.size);
  expect(new Set(events.map((r) => r.jti))).toEqual(jtis);
  const deliveries = await db.kysely.selectFrom("deliveries").select("jti").execute();
  expect(deliveries).toHaveLength(jtis.size);
  expect(new Set(deliveries.map((r) => r.jti))).toEqual(jtis);
}

/** Messages still in beta's work-queue inbox: published and not (yet) acknowledged. */
async function inboxLeft(jsm: JetStreamManager): Promise<number> {
  return (await jsm.streams.info(inboxStreamName("beta"))).state.messages;
}

interface Probe { readonly status: number; readonly checks?: Record<string, boolean> }

/**
 * Operator routes on a relay's one listener need the service token when it also serves the API;
 * a worker's listener is open, and ignores it.
 */
const OPERATOR = { authorization: `Bearer ${SERVICE_TOKEN}` };

/** GET /readyz; undefined when nothing answers. */
async function readyz(url: string): Promise<Probe | undefined> {
  try {
    const res = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(5000), headers: OPERATOR });
    const body = (await res.json().catch(() => ({}))) as { checks?: Record<string, boolean> };
    return { status: res.status, ...(body.checks ? { checks: body.checks } : {}) };
  } catch {
    return undefined;
  }
}

/** One GET over node:http: `agent` false sends `Connection: close`; an Agent with keepAlive keeps the socket. */
function get(url: string, agent: HttpAgent | false): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpGet(url, { agent }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.setTimeout(5000, () => req.destroy(new Error(`GET ${url} timed out`)));
  });
}

async function healthz(url: string): Promise<number> {
  return (await fetch(`${url}/healthz`)).status;
}

const metric = (url: string, name: string): Promise<number> => scrapeMetric(url, name, {}, OPERATOR);

function exitOf(w: WorkerProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  const c = w.child;
  if (c.exitCode !== null || c.signalCode !== null) return Promise.resolve({ code: c.exitCode, signal: c.signalCode });
  return new Promise((resolve) => c.once("exit", (code, signal) => resolve({ code, signal })));
}

async function worker(path: string): Promise<WorkerProcess> {
  const w = await startWorkerProcess(path);
  later(async () => {
    if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill("SIGKILL");
    await exitOf(w);
  });
  return w;
}

function pgTarget(): { host: string; port: number } {
  const u = new URL(TEST_DATABASE_URL);
  return { host: u.hostname, port: Number(u.port || 5432) };
}

async function proxy(): Promise<TcpProxy> {
  const p = await startTcpProxy(pgTarget());
  later(() => p.close());
  return p;
}

describe("shutdown", () => {
  it("SIGTERM under load: the worker exits 0 with everything it acknowledged stored; a second worker finishes; each event stored once", async () => {
    const N = 6000;
    const f = await fixture();
    // A short ack_wait, so messages that were on their way to the stopped worker come back soon.
    const beta = await prepareBeta(f, "graceful", { ackWaitSeconds: 3 });
    const events = await presign(f.alpha, beta.rcpt, N);
    await publishAll(f.client, events.tokens);

    const first = await worker(beta.configPath);
    await eventually(async () => (await count(beta.db, "events")) >= 500, 30_000, "the first worker storing events");
    expect(await first.stop()).toBe(0);
    const stored = await count(beta.db, "events");
    const left = await inboxLeft(f.jsm);
    // Mid-load: there was work left.
    expect(left).toBeGreaterThan(0);
    // Work queue: an acknowledged message leaves the stream. Everything acknowledged is stored...
    expect(stored).toBeGreaterThanOrEqual(N - left);
    // ... and a graceful stop acknowledges everything it stored (the server may take a moment over the last acks).
    await eventually(async () => N - (await inboxLeft(f.jsm)) === stored, 2000, "every stored event acknowledged");

    const second = await worker(beta.configPath);
    await eventually(async () => (await count(beta.db, "events")) === N && (await inboxLeft(f.jsm)) === 0, 40_000, `${N} events stored`);
    expect(await second.stop()).toBe(0);
    await expectExactlyOnce(beta.db, events.jtis);
  });

  it("a second SIGTERM exits at once with a non-zero code; nothing is lost and a new worker stores each event once", async () => {
    const N = 4000;
    const f = await fixture();
    const pg = await proxy();
    const beta = await prepareBeta(f, "forced", { ackWaitSeconds: 3 }, pg.via(TEST_DATABASE_URL));
    const events = await presign(f.alpha, beta.rcpt, N);
    await publishAll(f.client, events.tokens);

    const first = await worker(beta.configPath);
    const exited = exitOf(first);
    await eventually(async () => (await count(beta.db, "events")) >= 500, 30_000, "the worker storing events");
    // Postgres hangs: the batches in hand can neither commit nor fail, so a graceful stop would wait for its deadline.
    pg.stall();
    first.child.kill("SIGTERM");
    // Readiness is false from the first signal on: nothing answers 200 until the process is gone.
    const probes: (Probe | undefined)[] = [];
    await eventually(async () => {
      const p = await readyz(first.url);
      probes.push(p);
      return p === undefined || (p.status === 503 && p.checks?.worker === false);
    }, 5000, "readiness to turn false after SIGTERM");
    expect(probes.filter((p) => p?.status === 200)).toEqual([]);
    expect(first.child.exitCode).toBeNull();

    const t0 = Date.now();
    first.child.kill("SIGTERM");
    const { code } = await exited;
    expect(code).not.toBe(0);
    expect(code).not.toBeNull();
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(first.stderr()).toContain("second SIGTERM");

    pg.restore();
    const stored = await count(beta.db, "events");
    const left = await inboxLeft(f.jsm);
    expect(left).toBeGreaterThan(0);
    // A forced exit may leave stored events unacknowledged (they come back as duplicates), never the reverse.
    expect(stored).toBeGreaterThanOrEqual(N - left);

    const second = await worker(beta.configPath);
    await eventually(async () => (await count(beta.db, "events")) === N && (await inboxLeft(f.jsm)) === 0, 40_000, `${N} events stored`);
    expect(await second.stop()).toBe(0);
    await expectExactlyOnce(beta.db, events.jtis);
  });

  /** A worker relay in-process whose Postgres goes through a proxy, so a test can make /readyz slow. */
  async function slowProbeRelay(f: Fixture, label: string): Promise<{ relay: Relay; pg: TcpProxy }> {
    const pg = await proxy();
    const schema = testSchema(label);
    later(() => schema.drop());
    const config = homeserverConfig(f.beta, { ...schema, url: pg.via(schema.url) }, { natsUrl: f.nats.url, peers: [f.alpha] });
    const relay = createRelay(config, { api: false, worker: true }, { log: silent });
    later(() => relay.close());
    await relay.start();
    expect(await readyz(relay.url)).toEqual({ status: 200, checks: { postgres: true, nats: true, worker: true, streams: true } });
    return { relay, pg };
  }

  it("/readyz answers 503 with checks.worker false to a probe in flight when shutdown starts", async () => {
    const f = await fixture();
    const { relay, pg } = await slowProbeRelay(f, "readyz_close");
    // A probe that takes a while: its Postgres check waits (up to its 1 s timeout) on a hung server.
    pg.stall();
    const probe = get(`${relay.url}/readyz`, false);
    await new Promise((r) => setTimeout(r, 300));
    const closed = relay.close();
    const answer = await probe;
    pg.restore();
    await closed;
    expect(answer.status).toBe(503);
    expect((JSON.parse(answer.body) as { checks: Record<string, boolean> }).checks.worker).toBe(false);
  });

  it("a keep-alive HTTP request in flight when shutdown starts does not hold shutdown up", async () => {
    const f = await fixture();
    const { relay, pg } = await slowProbeRelay(f, "keepalive_close");
    // As Prometheus or a load balancer would: a persistent connection.
    const agent = new HttpAgent({ keepAlive: true });
    later(async () => agent.destroy());
    pg.stall();
    const probe = get(`${relay.url}/readyz`, agent);
    await new Promise((r) => setTimeout(r, 300));
    const closed = relay.close().then(() => Date.now());
    const answer = await probe;
    const answeredAt = Date.now();
    pg.restore();
    expect(answer.status).toBe(503);
    // Nothing else is in hand: closing takes well under a second once the probe is answered,
    // and far less than the worker's shutdown deadline (20 s by default).
    const closedAt = await Promise.race([closed, new Promise<undefined>((r) => setTimeout(() => r(undefined), 5000))]);
    expect(closedAt === undefined ? Infinity : closedAt - answeredAt, "ms from the answer to closed").toBeLessThan(5000);
  });
});

describe("outages", () => {
  it("NATS killed (SIGKILL) and restarted: /readyz says so, /healthz stays 200, and every acknowledged publish is stored once", async () => {
    const f = await fixture({ syncAlways: true });
    const beta = await prepareBeta(f, "nats_restart", { ackWaitSeconds: 3 });
    const before = await presign(f.alpha, beta.rcpt, 3000);
    const after = await presign(f.alpha, beta.rcpt, 500);
    // Acknowledged by JetStream (fsynced with sync_interval: always) before any worker runs.
    await publishAll(f.client, before.tokens);
    await f.client.close();

    const relay = createRelay(beta.config, { api: true, worker: true }, { log: silent });
    later(() => relay.close());
    await relay.start();
    expect((await readyz(relay.url))?.status).toBe(200);
    await eventually(async () => (await count(beta.db, "events")) >= 200, 20_000, "the worker storing events");
    // The server dies with the worker mid-stream.
    await f.nats.kill();
    const storedAtKill = await count(beta.db, "events");
    expect(storedAtKill).toBeLessThan(before.jtis.size);
    const down = await eventually(async () => {
      const p = await readyz(relay.url);
      return p?.status === 503 && p.checks?.nats === false ? p : undefined;
    }, 5000, "/readyz 503 with nats false");
    expect(down.checks).toEqual({ postgres: true, nats: false, worker: true, streams: true });
    expect(await healthz(relay.url)).toBe(200);

    await f.nats.restart();
    await eventually(async () => (await readyz(relay.url))?.status === 200, 15_000, "/readyz 200 after the restart");
    const client = await natsClient(f.nats.url);
    later(() => client.close());
    await publishAll(client, after.tokens);

    const all = new Set([...before.jtis, ...after.jtis]);
    await eventually(async () => (await count(beta.db, "events")) === all.size, 30_000, `${all.size} events stored`);
    await expectExactlyOnce(beta.db, all);
    const jsm = await jetstreamManager(client.nc);
    await eventually(async () => (await inboxLeft(jsm)) === 0, 5000, "an empty inbox");
  });

  it("Postgres unreachable: batches fail and come back, /readyz says so, and after it returns every event is stored once", async () => {
    const f = await fixture();
    const pg = await proxy();
    const schema = testSchema("pg_outage");
    later(() => schema.drop());
    const config = homeserverConfig(f.beta, { ...schema, url: pg.via(schema.url) }, {
      natsUrl: f.nats.url, peers: [f.alpha], overrides: { rateLimits: NO_THROTTLE, worker: { retryDelayMs: 200 } },
    });
    const relay: Relay = createRelay(config, { api: true, worker: true }, { log: silent });
    later(() => relay.close());
    await relay.start();
    const db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
    later(() => db.close());
    const rcpt = await grantAll(db);
    const before = await presign(f.alpha, rcpt, 500);
    const during = await presign(f.alpha, rcpt, 500);

    await publishAll(f.client, before.tokens);
    await eventually(async () => (await count(db, "events")) === 500, 20_000, "500 events stored");
    expect(await metric(relay.url, "fedrelay_batch_failures_total")).toBe(0);

    pg.cut();
    await publishAll(f.client, during.tokens);
    await eventually(async () => (await metric(relay.url, "fedrelay_batch_failures_total")) > 0, 10_000, "a failed batch");
    const down = await eventually(async () => {
      const p = await readyz(relay.url);
      return p?.status === 503 && p.checks?.postgres === false ? p : undefined;
    }, 5000, "/readyz 503 with postgres false");
    expect(down.checks?.nats).toBe(true);
    expect(await healthz(relay.url)).toBe(200);
    // Nothing committed while it was away.
    expect(await count(db, "events")).toBe(500);

    pg.restore();
    const all = new Set([...before.jtis, ...during.jtis]);
    await eventually(async () => (await count(db, "events")) === all.size, 20_000, `${all.size} events stored`);
    await expectExactlyOnce(db, all);
    await eventually(async () => (await readyz(relay.url))?.status === 200, 5000, "/readyz 200 again");
  });
});

describe("per-sender backlog quota", () => {
  it("a sender over its quota is refused with a reason, other senders still get in, and nothing stored is dropped", async () => {
    const f = await fixture();
    const gamma = await identity("gamma");
    const hs = await startHomeserver(f.beta, {
      natsUrl: f.nats.url, peers: [f.alpha, gamma], roles: { api: true, worker: false },
      overrides: { inbox: { maxMessagesPerSender: 20 } },
    });
    later(() => hs.close());
    const fromAlpha = await Promise.all(Array.from({ length: 21 }, () => signed(f.alpha, "beta", [{ cid: "nobody" }])));
    for (const e of fromAlpha.slice(0, 20)) await publishEvent(f.client.js, inboxSubject("beta", "alpha"), Buffer.from(e.token), 5000);

    const refused = await publishEvent(f.client.js, inboxSubject("beta", "alpha"), Buffer.from(fromAlpha[20]!.token), 5000).then(
      () => undefined, (err: unknown) => err);
    expect(refused).toBeInstanceOf(RelayError);
    expect((refused as RelayError).code).toBe("publish_failed");
    expect((refused as RelayError).message).toMatch(/maximum messages per subject exceeded/);

    const fromGamma = await signed(gamma, "beta", [{ cid: "nobody" }]);
    await publishEvent(f.client.js, inboxSubject("beta", "gamma"), Buffer.from(fromGamma.token), 5000);

    const info = await f.jsm.streams.info(inboxStreamName("beta"), { subjects_filter: ">" });
    expect(info.state.subjects).toEqual({ [inboxSubject("beta", "alpha")]: 20, [inboxSubject("beta", "gamma")]: 1 });

    // Once a worker has drained the backlog, the sender's retry with the same bytes gets in.
    const worker = createRelay(hs.config, { api: false, worker: true }, { log: silent });
    later(() => worker.close());
    await worker.start();
    await eventually(async () => (await inboxLeft(f.jsm)) === 0, 10_000, "the backlog drained");
    await publishEvent(f.client.js, inboxSubject("beta", "alpha"), Buffer.from(fromAlpha[20]!.token), 5000);
    await eventually(async () => (await count(hs.relay.db, "events")) === 22, 10_000, "22 events stored");
  });
});
