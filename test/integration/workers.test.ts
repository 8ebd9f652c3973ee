import { jetstreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureInbox } from "../../src/transport/streams.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import { eventually, homeserverConfig, identity, natsClient, signed, type NatsClient } from "../helpers/federation.ts";
import { scrapeMetric } from "../helpers/metrics.ts";
import { startWorkerProcess, writeConfigFile, type WorkerProcess } from "../helpers/processes.ts";

const EVENTS = 2000;
const CLIENTS = 40;

let nats: LocalNats;
let client: NatsClient;
let schema: TestSchema;
let db: Db;

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  schema = testSchema("two_workers");
});

afterAll(async () => {
  await db?.close();
  await schema?.drop();
  await client?.close();
  await nats?.stop();
});


describe("several worker processes share one consumer", () => {
  it(`two worker processes commit every one of ${EVENTS} events exactly once`, async () => {
    const [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
    const config = homeserverConfig(beta, schema, { natsUrl: nats.url, peers: [alpha], overrides: { log: { level: "warn" } } });
    db = createDb(config.postgres);
    await migrate(db.pool, config.postgres.schema);
    await ensureInbox(await jetstreamManager(client.nc), "beta", { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, ["beta", "alpha"]);
    const caps: string[] = [];
    for (let c = 0; c < CLIENTS; c++) {
      await registerClient(db, `client-${c}`);
      caps.push((await issueCapability(db, `client-${c}`, "g@alpha", "alpha")).capability);
    }

    const path = await writeConfigFile({ ...config, keys: { retired: [] } });
    const workers: WorkerProcess[] = await Promise.all([startWorkerProcess(path), startWorkerProcess(path)]);
    try {
      const jtis = new Set<string>();
      for (let i = 0; i < EVENTS; i += 100) {
        await Promise.all(Array.from({ length: 100 }, async (_, k) => {
          const c = (i + k) % CLIENTS;
          const e = await signed(alpha, "beta", [{ cid: `client-${c}`, cap: caps[c]! }]);
          jtis.add(e.claims.jti);
          await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(e.token), 5000);
        }));
      }
      expect(jtis.size).toBe(EVENTS);

      await eventually(async () => {
        const { n } = await db.kysely.selectFrom("events").select((eb) => eb.fn.countAll<string>().as("n")).executeTakeFirstOrThrow();
        return Number(n) === EVENTS;
      }, 60_000, `${EVENTS} events`);
      const stored = await db.kysely.selectFrom("events").select("jti").execute();
      expect(new Set(stored.map((r) => r.jti))).toEqual(jtis);
      const deliveries = await db.kysely.selectFrom("deliveries").select(["client_id", "seq"]).orderBy("client_id").orderBy("seq").execute();
      expect(deliveries).toHaveLength(EVENTS);
      // Each client's cursors are 1..n with no gap or repeat: commit order, whichever worker committed.
      const gaps = await sql<{ client_id: string }>`
        SELECT client_id FROM deliveries GROUP BY client_id HAVING max(seq) <> count(*) OR min(seq) <> 1`.execute(db.kysely);
      expect(gaps.rows).toEqual([]);

      const accepted = await Promise.all(workers.map((w) => scrapeMetric(w.url, "fedrelay_events_accepted_total")));
      expect(accepted.reduce((a, b) => a + b, 0)).toBe(EVENTS);
      for (const n of accepted) expect(n).toBeGreaterThan(0);
    } finally {
      const codes = await Promise.all(workers.map((w) => w.stop()));
      expect(codes).toEqual([0, 0]);
    }
  });
});
