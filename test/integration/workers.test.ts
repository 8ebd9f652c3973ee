/**
 * Several worker processes on one inbox: every event committed once, whichever
 * worker takes it; and (issue 16) two workers delivering to the same clients at
 * once. Their batches lock a client's row only from the last statement to
 * COMMIT, and take cursors and charge buckets from the row as it is then.
 * Whatever the interleaving, a client reading and acknowledging all the while
 * must see every message once, in gap-free cursor order, and each bucket must be
 * charged once per delivery.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { afterAll, describe, expect, it } from "vitest";
import { startLocalNats } from "../../src/local-nats.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { ackThrough, listMessages } from "../../src/store/messages.ts";
import { migrate } from "../../src/store/migrate.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureInbox } from "../../src/transport/streams.ts";
import { testSchema } from "../helpers/db.ts";
import { eventually, homeserverConfig, identity, natsClient, signed, type Identity, type NatsClient } from "../helpers/federation.ts";
import { scrapeMetric } from "../helpers/metrics.ts";
import { startWorkerProcess, writeConfigFile, type WorkerProcess } from "../helpers/processes.ts";

const cleanups: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

interface Destination {
  readonly alpha: Identity;
  readonly nats: NatsClient;
  readonly db: Db;
  /** beta's config file, for its worker processes. */
  readonly path: string;
  /** beta's clients, each with a capability for g@alpha. */
  readonly members: { cid: string; cap: string }[];
}

/** beta on its own nats-server and schema, with its inbox and `members` clients. */
async function destination(schemaName: string, members: number, overrides: Record<string, unknown> = {}): Promise<Destination> {
  const server = await startLocalNats();
  const nats = await natsClient(server.url);
  const schema = testSchema(schemaName);
  const [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
  const config = homeserverConfig(beta, schema, { natsUrl: server.url, peers: [alpha], overrides: { log: { level: "warn" }, ...overrides } });
  const db = createDb(config.postgres);
  cleanups.push(async () => {
    await db.close();
    await schema.drop();
    await nats.close();
    await server.stop();
  });
  await migrate(db.pool, config.postgres.schema);
  await ensureInbox(await jetstreamManager(nats.nc), "beta", { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, ["beta", "alpha"]);
  const list: { cid: string; cap: string }[] = [];
  for (let c = 0; c < members; c++) {
    await registerClient(db, `member-${c}`);
    list.push({ cid: `member-${c}`, cap: (await issueCapability(db, `member-${c}`, "g@alpha", "alpha")).capability });
  }
  return { alpha, nats, db, path: await writeConfigFile({ ...config, keys: { retired: [] } }), members: list };
}

/** Publishes `events` events from alpha, `rcptOf(i)` addressed, 50 at a time; returns their ids. */
async function publish(d: Destination, events: number, rcptOf: (i: number) => { cid: string; cap: string }[]): Promise<string[]> {
  const sent: string[] = [];
  for (let i = 0; i < events; i += 50) {
    await Promise.all(Array.from({ length: Math.min(50, events - i) }, async (_, k) => {
      const e = await signed(d.alpha, "beta", rcptOf(i + k));
      sent.push(e.claims.jti);
      await publishEvent(d.nats.js, inboxSubject("beta", "alpha"), Buffer.from(e.token), 5000);
    }));
  }
  return sent;
}

/** Both workers took part. */
async function expectBothCommitted(workers: readonly WorkerProcess[], events: number): Promise<void> {
  const accepted = await Promise.all(workers.map((w) => scrapeMetric(w.url, "fedrelay_events_accepted_total")));
  expect(accepted.reduce((a, b) => a + b, 0)).toBe(events);
  for (const n of accepted) expect(n).toBeGreaterThan(0);
}

async function withTwoWorkers(path: string, run: (workers: WorkerProcess[]) => Promise<void>): Promise<void> {
  const workers = await Promise.all([startWorkerProcess(path), startWorkerProcess(path)]);
  try {
    await run(workers);
  } finally {
    const codes = await Promise.all(workers.map((w) => w.stop()));
    expect(codes).toEqual([0, 0]);
  }
}

describe("several worker processes share one consumer", () => {
  const EVENTS = 2000;
  it(`two worker processes commit every one of ${EVENTS} events exactly once`, async () => {
    const d = await destination("two_workers", 40);
    await withTwoWorkers(d.path, async (workers) => {
      const jtis = new Set(await publish(d, EVENTS, (i) => [d.members[i % d.members.length]!]));
      expect(jtis.size).toBe(EVENTS);

      await eventually(async () => {
        const { n } = await d.db.kysely.selectFrom("events").select((eb) => eb.fn.countAll<string>().as("n")).executeTakeFirstOrThrow();
        return Number(n) === EVENTS;
      }, 60_000, `${EVENTS} events`);
      const stored = await d.db.kysely.selectFrom("events").select("jti").execute();
      expect(new Set(stored.map((r) => r.jti))).toEqual(jtis);
      const deliveries = await d.db.kysely.selectFrom("deliveries").select(["client_id", "seq"]).orderBy("client_id").orderBy("seq").execute();
      expect(deliveries).toHaveLength(EVENTS);
      // Each client's cursors are 1..n with no gap or repeat: commit order, whichever worker committed.
      const gaps = await sql<{ client_id: string }>`
        SELECT client_id FROM deliveries GROUP BY client_id HAVING max(seq) <> count(*) OR min(seq) <> 1`.execute(d.db.kysely);
      expect(gaps.rows).toEqual([]);
      await expectBothCommitted(workers, EVENTS);
    });
  });
});

/** Reads and acknowledges as a client would, until it has seen `expected` messages: what it saw, in order. */
async function readContinuously(db: Db, clientId: string, expected: number, deadline: number): Promise<{ cursors: number[]; jtis: string[] }> {
  const cursors: number[] = [];
  const jtis: string[] = [];
  let after: number | undefined;
  while (jtis.length < expected && Date.now() < deadline) {
    const page = await listMessages(db, clientId, after, 7);
    for (const m of page) { cursors.push(m.cursor); jtis.push(m.jti); }
    if (page.length > 0) {
      after = page.at(-1)!.cursor;
      await ackThrough(db, clientId, after);
    } else {
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  return { cursors, jtis };
}

describe("two workers delivering to the same clients", () => {
  const EVENTS = 600;
  /** A bucket that never runs dry here and barely refills: what is left shows what was charged. */
  const LIMIT = { rate: 0.001, burst: 100_000 };
  it(`commit interleaved batches of ${EVENTS} group events while clients read and acknowledge: nothing skipped or repeated, each bucket charged once per delivery`, async () => {
    // Small batches, so the two workers' batches to the group interleave many times.
    const d = await destination("shared_clients", 8, { rateLimits: { client: LIMIT, senderClient: LIMIT }, worker: { batchSize: 16 } });
    await withTwoWorkers(d.path, async (workers) => {
      const deadline = Date.now() + 60_000;
      const readers = d.members.map((m) => readContinuously(d.db, m.cid, EVENTS, deadline));
      const sent = await publish(d, EVENTS, () => d.members);
      for (const { cursors, jtis } of await Promise.all(readers)) {
        expect(jtis.length).toBe(EVENTS);
        expect(new Set(jtis)).toEqual(new Set(sent));
        // Read in pages, acknowledged as it went: 1, 2, 3, … with no gap or repeat.
        expect(cursors).toEqual(Array.from({ length: EVENTS }, (_, i) => i + 1));
      }
      await expectBothCommitted(workers, EVENTS);

      // Each member's all-senders and per-sender bucket paid for exactly its EVENTS deliveries.
      const rows = await d.db.kysely.selectFrom("clients").select(["id", "buckets", "delivery_seq", "acked_seq"]).execute();
      expect(rows).toHaveLength(d.members.length);
      for (const row of rows) {
        expect([Number(row.delivery_seq), Number(row.acked_seq)]).toEqual([EVENTS, EVENTS]);
        const buckets = row.buckets as Record<string, [number, number]>;
        for (const slot of ["*", "alpha"]) {
          const [tokens] = buckets[slot]!;
          // Refill over the run is at most 0.001/s × 60 s.
          expect(tokens).toBeGreaterThanOrEqual(LIMIT.burst - EVENTS);
          expect(tokens).toBeLessThan(LIMIT.burst - EVENTS + 0.1);
        }
      }
    });
  }, 90_000);
});
