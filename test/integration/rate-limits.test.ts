/**
 * Spam prevention (issue 4) against a real nats-server and Postgres: token
 * buckets charged in the commit transaction, exact across worker processes,
 * with injected clocks (a frozen one shared through the config file by every
 * process, or a variable one in-process) instead of sleeps.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import type { EventClaims } from "../../src/protocol/claims.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { createRelay, type Relay } from "../../src/relay.ts";
import { storedDecisions } from "../../src/reports.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import type { Db } from "../../src/store/db.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureReportStream, inboxConsumerName } from "../../src/transport/streams.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import {
  addClient, eventually, grantCapability, homeserverConfig, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient, type TestHomeserver,
} from "../helpers/federation.ts";
import { metricValue, scrapeMetric } from "../helpers/metrics.ts";
import { startWorkerProcess, writeConfigFile, type WorkerProcess } from "../helpers/processes.ts";

type Rcpt = EventClaims["rcpt"];

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity;

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  alpha = await identity("alpha");
  // alpha runs its report stream, so the destinations' reports to it are accepted.
  await ensureReportStream(await jetstreamManager(client.nc), "alpha", 1);
});

afterAll(async () => {
  await client?.close();
  await nats?.stop();
});

/** Signs one event per recipient list and publishes them to `destination`'s inbox, 50 at a time; returns the jtis in order. */
async function publishAll(destination: string, rcpts: readonly Rcpt[], extra: Partial<EventClaims> = {}): Promise<string[]> {
  const jtis: string[] = [];
  for (let i = 0; i < rcpts.length; i += 50) {
    const chunk = await Promise.all(rcpts.slice(i, i + 50).map(async (rcpt) => {
      const e = await signed(alpha, destination, rcpt, extra);
      await publishEvent(client.js, inboxSubject(destination, "alpha"), Buffer.from(e.token), 5000);
      return e.claims.jti;
    }));
    jtis.push(...chunk);
  }
  return jtis;
}

const workerMetric = scrapeMetric;

const relayMetric = async (relay: Relay, name: string, labels: Record<string, string> = {}): Promise<number> =>
  metricValue(await relay.metrics.registry.metrics(), name, labels);

async function countRows(db: Db, table: "events" | "deliveries" | "all_recipient_refusals" | "refused_events", where: { client_id?: string; reason?: string } = {}): Promise<number> {
  let q = db.kysely.selectFrom(table).select((eb) => eb.fn.countAll<string>().as("n"));
  if (where.client_id !== undefined) q = q.where("client_id" as never, "=", where.client_id as never);
  if (where.reason !== undefined) q = q.where("reason" as never, "=", where.reason as never);
  return Number((await q.executeTakeFirstOrThrow()).n);
}

async function bucketRow(db: Db, key: string): Promise<{ tokens: number; updated_at: number } | undefined> {
  return db.kysely.selectFrom("rate_buckets").select(["tokens", "updated_at"]).where("key", "=", key).executeTakeFirst();
}

/** A client's own rate buckets, as its row keeps them: "*" for all senders, else by sender. */
async function clientBuckets(db: Db, id: string): Promise<Record<string, [number, number]>> {
  return (await db.kysely.selectFrom("clients").select("buckets").where("id", "=", id).executeTakeFirstOrThrow()).buckets;
}

async function storedJtis(db: Db): Promise<string[]> {
  return (await db.kysely.selectFrom("events").select("jti").where("iss", "=", "alpha").execute()).map((r) => r.jti);
}

/** Clients with a capability for g@alpha, created directly in the store (faster than the API for many). */
async function clientsWithCaps(db: Db, ids: readonly string[]): Promise<Map<string, string>> {
  const caps = new Map<string, string>();
  for (const id of ids) {
    await registerClient(db, id);
    caps.set(id, (await issueCapability(db, id, "g@alpha", "alpha")).capability);
  }
  return caps;
}

describe("three worker processes share one client's bucket exactly (clock frozen in the config file)", () => {
  const FROZEN_AT = Math.floor(Date.now() / 1000);
  const FLOODED = { rate: 1, burst: 50 };
  // Signed at the frozen instant, so verification sees the same clock as the charges.
  const AT_FROZEN: Partial<EventClaims> = { iat: FROZEN_AT, exp: FROZEN_AT + 3600 };
  let api: TestHomeserver;
  let workers: WorkerProcess[] = [];
  const caps: Record<string, string> = {};

  const refusedByWorkers = async (): Promise<number[]> =>
    Promise.all(workers.map((w) => workerMetric(w.url, "fedrelay_recipients_refused_total", { reason: "rate_limited" })));
  const sum = (xs: readonly number[]): number => xs.reduce((a, b) => a + b, 0);

  beforeAll(async () => {
    const beta = await identity("beta");
    api = await startHomeserver(beta, {
      natsUrl: nats.url,
      peers: [alpha],
      roles: { api: true, worker: false },
      overrides: {
        clock: { frozenAt: FROZEN_AT },
        rateLimits: { clients: { flooded: FLOODED } },
        // Small batches, so all three workers take part.
        worker: { batchSize: 20, retryDelayMs: 100 },
      },
    });
    for (const id of ["flooded", "calm", "bot"]) {
      await addClient(api, id);
      caps[id] = await grantCapability(api, id, "g@alpha");
    }
    const path = await writeConfigFile({ ...api.config, keys: { retired: [] }, http: { port: 0 }, log: { level: "warn" } });
    workers = await Promise.all([startWorkerProcess(path), startWorkerProcess(path), startWorkerProcess(path)]);
  });

  afterAll(async () => {
    const codes = await Promise.all(workers.map((w) => w.stop()));
    await api?.close();
    expect(codes).toEqual([0, 0, 0]);
  });

  it("a burst of 1,000 events to a client with burst 50 commits exactly 50 and refuses 950 rate_limited, while 200 to another client at the same time all arrive", async () => {
    // One calm event after every five flooded ones: both clients' events are interleaved in the stream.
    const rcpts: Rcpt[] = Array.from({ length: 1200 }, (_, i) =>
      i % 6 === 5 ? [{ cid: "calm", cap: caps.calm! }] : [{ cid: "flooded", cap: caps.flooded! }]);
    const jtis = await publishAll("beta", rcpts, AT_FROZEN);
    expect(new Set(jtis).size).toBe(1200);

    const db = api.relay.db;
    await eventually(async () => (await countRows(db, "events")) === 1200, 30_000, "all 1,200 events processed");

    // The frozen clock refills nothing: the burst plus rate × elapsed injected time.
    const elapsed = FROZEN_AT - FROZEN_AT;
    const expectedFlooded = Math.min(FLOODED.burst, FLOODED.burst + FLOODED.rate * elapsed);
    expect(expectedFlooded).toBe(50);
    expect(await countRows(db, "deliveries", { client_id: "flooded" })).toBe(expectedFlooded);
    expect(await countRows(db, "all_recipient_refusals", { client_id: "flooded", reason: "rate_limited" })).toBe(1000 - expectedFlooded);
    expect(await countRows(db, "all_recipient_refusals", { client_id: "flooded" })).toBe(1000 - expectedFlooded);
    expect(await countRows(db, "deliveries", { client_id: "calm" })).toBe(200);
    expect(await countRows(db, "all_recipient_refusals", { client_id: "calm" })).toBe(0);
    expect(await countRows(db, "refused_events")).toBe(0);
    // Cursors of the flooded client are 1..50: no delivery was committed and then taken back.
    const seqs = await db.kysely.selectFrom("deliveries").select("seq").where("client_id", "=", "flooded").orderBy("seq").execute();
    expect(seqs.map((r) => Number(r.seq))).toEqual(Array.from({ length: expectedFlooded }, (_, i) => i + 1));
    // Its buckets are empty, stamped with the frozen clock: its own limit applies to each sender too.
    expect(await clientBuckets(db, "flooded")).toEqual({ "*": [0, FROZEN_AT], alpha: [0, FROZEN_AT] });

    // The refusals are counted where they happened, and add up across the processes.
    const refused = await eventually(async () => {
      const per = await refusedByWorkers();
      return sum(per) === 950 && per;
    }, 10_000, "950 rate_limited refusals in the workers' metrics");
    expect(sum(refused)).toBe(950);
    const received = await Promise.all(workers.map((w) => workerMetric(w.url, "fedrelay_events_received_total")));
    for (const n of received) expect(n).toBeGreaterThan(0);
    expect(sum(received)).toBe(1200);
  });

  it("a client limit put through PUT /v1/admin/rate-limits/clients/{id} applies in every worker process within one second", async () => {
    const put = await http(`${api.relay.url}/v1/admin/rate-limits/clients/bot`, { method: "PUT", token: SERVICE_TOKEN, body: { rate: 1, burst: 3 } });
    expect(put).toEqual({ status: 200, json: { client: "bot", rate: 1, burst: 3 } });
    const appliedBy = Date.now() + 1000;
    const listed = await http(`${api.relay.url}/v1/admin/rate-limits`, { token: SERVICE_TOKEN });
    expect((listed.json.clients as Record<string, unknown>).bot).toEqual({ rate: 1, burst: 3 });
    expect(listed.json.runtime).toEqual({ servers: {}, clients: { bot: { rate: 1, burst: 3 } } });

    // The requirement is "within one second": that second is the only wait, and no further.
    await new Promise((r) => setTimeout(r, Math.max(0, appliedBy - Date.now())));
    const before = sum(await refusedByWorkers());
    await publishAll("beta", Array.from({ length: 60 }, () => [{ cid: "bot", cap: caps.bot! }]), AT_FROZEN);
    const db = api.relay.db;
    await eventually(async () => (await countRows(db, "events")) === 1260, 15_000, "60 more events processed");

    // A worker still on the configured default (burst 600) would have delivered all 60.
    expect(await countRows(db, "deliveries", { client_id: "bot" })).toBe(3);
    expect(await countRows(db, "all_recipient_refusals", { client_id: "bot", reason: "rate_limited" })).toBe(57);
    await eventually(async () => sum(await refusedByWorkers()) - before === 57, 10_000, "57 more refusals in the workers' metrics");
  });
});

describe("a sender over its server-level limit (clock injected in-process)", () => {
  let clock = 0;
  let relay: Relay | undefined;
  let schema: TestSchema | undefined;

  async function startClocked(name: string, rateLimits: Record<string, unknown>): Promise<Relay> {
    const id = await identity(name);
    schema = testSchema(name);
    const config = homeserverConfig(id, schema, { natsUrl: nats.url, peers: [alpha], overrides: { rateLimits } });
    relay = createRelay(config, { api: true, worker: true }, { log: pino({ level: "silent" }), now: () => clock });
    await relay.start();
    return relay;
  }

  afterAll(async () => {
    await relay?.close();
    await schema?.drop();
  });

  // Client buckets that never bite, so only the sender's bucket is in play.
  const GENEROUS = { rate: 100_000, burst: 100_000 };

  it("is delayed, not stored, and then delivered exactly once when its bucket refills", async () => {
    try {
      clock = Math.floor(Date.now() / 1000);
      const t0 = clock;
      const gamma = await startClocked("gamma", { servers: { alpha: { rate: 10, burst: 1000 } }, client: GENEROUS, senderClient: GENEROUS });
      const db = gamma.db;
      const ids = Array.from({ length: 20 }, (_, i) => `client-${i}`);
      const caps = await clientsWithCaps(db, ids);

      const jtis = await publishAll("gamma", Array.from({ length: 1010 }, (_, i) => [{ cid: ids[i % 20]!, cap: caps.get(ids[i % 20]!)! }]));
      expect(new Set(jtis).size).toBe(1010);

      // The burst is 1,000; the clock does not move, so nothing refills.
      await eventually(async () => (await countRows(db, "events")) === 1000 && (await relayMetric(gamma, "fedrelay_events_delayed_total")) >= 10,
        20_000, "1,000 stored and the rest delayed");
      // Delayed events keep coming back (every 100 ms, the time one token takes) and keep being delayed, never stored.
      await eventually(async () => (await relayMetric(gamma, "fedrelay_events_delayed_total")) >= 40, 10_000, "delayed events retried");
      expect(await countRows(db, "events")).toBe(1000);
      expect(await countRows(db, "deliveries")).toBe(1000);
      expect(await countRows(db, "all_recipient_refusals")).toBe(0);
      expect(await countRows(db, "refused_events")).toBe(0);
      const waiting = new Set(jtis);
      for (const j of await storedJtis(db)) waiting.delete(j);
      expect(waiting.size).toBe(10);
      expect(await bucketRow(db, "s:alpha")).toEqual({ tokens: 0, updated_at: t0 });

      // One injected second refills 10 tokens: exactly what the 10 delayed events need.
      clock = t0 + 1;
      await eventually(async () => (await countRows(db, "events")) === 1010, 15_000, "all 1,010 stored");
      const stored = await storedJtis(db);
      expect(stored).toHaveLength(1010);
      expect(new Set(stored)).toEqual(new Set(jtis));
      expect(await countRows(db, "deliveries")).toBe(1010);
      const distinct = await sql<{ n: string }>`SELECT count(DISTINCT (iss, jti)) AS n FROM deliveries`.execute(db.kysely);
      expect(Number(distinct.rows[0]!.n)).toBe(1010);
      expect(await countRows(db, "all_recipient_refusals")).toBe(0);
      expect(await countRows(db, "refused_events")).toBe(0);
      expect(await bucketRow(db, "s:alpha")).toEqual({ tokens: 0, updated_at: t0 + 1 });
      // Each client's cursors are 1..n: no delivery was stored twice or taken back.
      const gaps = await sql<{ client_id: string }>`
        SELECT client_id FROM deliveries GROUP BY client_id HAVING max(seq) <> count(*) OR min(seq) <> 1`.execute(db.kysely);
      expect(gaps.rows).toEqual([]);
      await eventually(async () => (await relayMetric(gamma, "fedrelay_events_accepted_total")) === 1010, 10_000, "1,010 accepted in the metrics");
      expect(await relayMetric(gamma, "fedrelay_events_refused_total", { reason: "duplicate" })).toBe(0);
      expect(await relayMetric(gamma, "fedrelay_deliveries_committed_total")).toBe(1010);
    } finally {
      await relay?.close();
      await schema?.drop();
      relay = undefined;
      schema = undefined;
    }
  });

  it("a delayed event still over the limit after rateLimits.maxDelaySeconds of injected waiting is refused rate_limited for all its recipients and stored as refused", async () => {
    const RATE = 4;
    const MAX_DELAY = 2;
    clock = Math.floor(Date.now() / 1000);
    const t0 = clock;
    const delta = await startClocked("delta", {
      servers: { alpha: { rate: RATE, burst: 1000 } }, client: GENEROUS, senderClient: GENEROUS, maxDelaySeconds: MAX_DELAY,
    });
    const db = delta.db;
    const ids = Array.from({ length: 100 }, (_, i) => `client-${i}`);
    const caps = await clientsWithCaps(db, ids);
    const rcpt = (cid: string) => ({ cid, cap: caps.get(cid)! });

    // Ten events to 100 clients empty alpha's bucket (burst 1,000).
    const first = await publishAll("delta", Array.from({ length: 10 }, () => ids.map(rcpt)));
    await eventually(async () => (await countRows(db, "deliveries")) === 1000, 15_000, "the burst delivered");
    expect(await bucketRow(db, "s:alpha")).toEqual({ tokens: 0, updated_at: t0 });

    // A backlog of 40 two-recipient events: each needs 2 tokens, half a second at 4/s, so each is delayed.
    const backlogRcpts = Array.from({ length: 40 }, (_, i) => [rcpt(ids[2 * i]!), rcpt(ids[2 * i + 1]!)]);
    const backlog = await publishAll("delta", backlogRcpts);
    const publishedBy = Date.now() / 1000;
    await eventually(async () => {
      const consumer = await (await jetstreamManager(client.nc)).consumers.info(inboxStreamName("delta"), inboxConsumerName("receiver", "alpha"));
      return consumer.num_pending === 0 && (await relayMetric(delta, "fedrelay_events_delayed_total")) >= 40;
    }, 15_000, "the backlog delivered to the worker and delayed");
    expect(await countRows(db, "events")).toBe(10);
    expect(await countRows(db, "all_recipient_refusals")).toBe(0);

    // Move the injected clock more than maxDelaySeconds past every backlog event's publication. In those k
    // seconds alpha's bucket refills RATE × k tokens: the first events to take them are delivered, and the
    // rest, having waited longer than allowed, are refused.
    const k = Math.ceil(publishedBy - t0 + MAX_DELAY) + 1;
    expect(RATE * k).toBeLessThan(2 * backlog.length); // the test needs some of the backlog left over
    clock = t0 + k;
    const deliveredEvents = (RATE * k) / 2;
    const refusedEvents = backlog.length - deliveredEvents;

    await eventually(async () => (await countRows(db, "events")) === 50, 15_000, "every backlog event stored");
    expect(new Set(await storedJtis(db))).toEqual(new Set([...first, ...backlog]));
    expect(await countRows(db, "deliveries")).toBe(1000 + 2 * deliveredEvents);
    expect(await countRows(db, "all_recipient_refusals", { reason: "rate_limited" })).toBe(2 * refusedEvents);
    expect(await countRows(db, "all_recipient_refusals")).toBe(2 * refusedEvents);
    expect(await countRows(db, "refused_events")).toBe(0);

    // Each backlog event is all or nothing: both recipients delivered, or both refused rate_limited.
    const decisions = await storedDecisions(db, backlog.map((jti) => ({ iss: "alpha", jti })));
    expect(decisions).toHaveLength(40);
    const refusedDecisions = decisions.filter((d) => d.refused.length > 0);
    expect(refusedDecisions).toHaveLength(refusedEvents);
    for (const d of decisions) {
      const rcpts = backlogRcpts[backlog.indexOf(d.ref)]!.map((r) => r.cid);
      if (d.refused.length === 0) {
        expect(d.accepted).toEqual(rcpts);
      } else {
        expect(d.accepted).toEqual([]);
        expect(d.refused.map((r) => r.cid).sort()).toEqual([...rcpts].sort());
        expect(d.refused.every((r) => r.reason === "rate_limited")).toBe(true);
      }
    }
    expect(await bucketRow(db, "s:alpha")).toEqual({ tokens: 0, updated_at: t0 + k });
    // Stored as refused, so reported to the sender like any decision.
    await eventually(async () => (await relayMetric(delta, "fedrelay_reports_sent_total")) === 50, 10_000, "a report for every event");
    expect(await relayMetric(delta, "fedrelay_recipients_refused_total", { reason: "rate_limited" })).toBe(2 * refusedEvents);
    expect(await relayMetric(delta, "fedrelay_events_accepted_total")).toBe(50);
  });
});
