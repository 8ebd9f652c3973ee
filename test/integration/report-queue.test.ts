/**
 * Delivery reports leave the receive path (issue 15): the commit queues them,
 * a loop of their own publishes them, and a peer whose report stream never
 * answers costs a bounded number of publishes in flight and delays nobody
 * else's events or reports.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { reportStreamName, inboxSubject, reportSubject } from "../../src/protocol/subjects.ts";
import { trimReportQueue } from "../../src/store/report-queue.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { ensureReportStream } from "../../src/transport/streams.ts";
import { eventually, identity, natsClient, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { metricValue } from "../helpers/metrics.ts";

const IN_FLIGHT_PER_PEER = 4;
const PUBLISH_TIMEOUT_MS = 1000;

let nats: LocalNats;
let alpha: Identity;
let gamma: Identity;
let beta: TestHomeserver;
let client: NatsClient;

beforeAll(async () => {
  nats = await startLocalNats();
  [alpha, gamma] = await Promise.all([identity("alpha"), identity("gamma")]);
  beta = await startHomeserver(await identity("beta"), {
    natsUrl: nats.url, peers: [alpha, gamma],
    overrides: { fanout: { publishTimeoutMs: PUBLISH_TIMEOUT_MS }, reports: { maxInFlightPerPeer: IN_FLIGHT_PER_PEER } },
  });
  client = await natsClient(nats.url);
});

afterAll(async () => {
  await client?.close();
  await beta?.close();
  await nats?.stop();
});

async function send(from: Identity, n: number, prefix: string): Promise<string[]> {
  const jtis = Array.from({ length: n }, (_, i) => `${prefix}-${i}`);
  await Promise.all(jtis.map(async (jti) => {
    const { token } = await signed(from, "beta", [{ cid: "nobody" }], { jti });
    await publishEvent(client.js, inboxSubject("beta", from.name), Buffer.from(token, "latin1"), 5000);
  }));
  return jtis;
}

const queued = async (peer: string): Promise<number> =>
  Number((await sql<{ n: string }>`SELECT count(*) AS n FROM report_queue WHERE iss = ${peer}`.execute(beta.relay.db.kysely)).rows[0]!.n);

const storedEvents = async (peer: string): Promise<number> =>
  Number((await sql<{ n: string }>`SELECT count(*) AS n FROM events WHERE iss = ${peer}`.execute(beta.relay.db.kysely)).rows[0]!.n);

describe("a peer whose report stream never answers (a tarpit)", () => {
  it("holds at most its share of publishes, delays no one's events or reports, and gets its reports once it answers", async () => {
    const jsm = await jetstreamManager(client.nc);
    await ensureReportStream(jsm, "alpha", 1);
    // gamma listens on its report subject and never acknowledges: each publish waits out its timeout.
    const arrivals: number[] = [];
    const tarpit = client.nc.subscribe(reportSubject("gamma", "beta"), { callback: () => void arrivals.push(Date.now()) });

    await send(gamma, 40, "tarpit");
    await send(alpha, 40, "honest");
    // Every event is committed, and alpha's reports arrive, while gamma's still wait.
    await eventually(async () => (await storedEvents("alpha")) === 40 && (await storedEvents("gamma")) === 40, 10_000, "all 80 events stored");
    await eventually(async () => (await jsm.streams.info(reportStreamName("alpha"))).state.messages === 40, 10_000, "alpha's 40 reports");
    expect(await queued("alpha")).toBe(0);
    expect(await queued("gamma")).toBe(40);

    // Never more than its share at once: publishes to gamma within one timeout of each other.
    await eventually(async () => arrivals.length >= 2 * IN_FLIGHT_PER_PEER, 10_000, "gamma tried twice");
    for (const t of arrivals) expect(arrivals.filter((u) => u >= t && u < t + PUBLISH_TIMEOUT_MS - 100).length).toBeLessThanOrEqual(IN_FLIGHT_PER_PEER);
    const metrics = await beta.relay.metrics.registry.metrics();
    expect(metricValue(metrics, "fedrelay_report_failures_total", { peer: "gamma" })).toBeGreaterThanOrEqual(IN_FLIGHT_PER_PEER);
    expect(metricValue(metrics, "fedrelay_report_failures_total", { peer: "alpha" })).toBe(0);
    expect(metricValue(metrics, "fedrelay_reports_sent_total", { peer: "alpha" })).toBe(40);

    // gamma answers again: after its back-off, every report it was owed arrives, once.
    tarpit.unsubscribe();
    await ensureReportStream(jsm, "gamma", 1);
    await eventually(async () => (await queued("gamma")) === 0, 30_000, "gamma's reports sent");
    const info = await jsm.streams.info(reportStreamName("gamma"));
    expect(info.state.messages).toBeGreaterThanOrEqual(40);
    expect(metricValue(await beta.relay.metrics.registry.metrics(), "fedrelay_reports_sent_total", { peer: "gamma" })).toBe(40);
  });
});

describe("the report queue's bounds", () => {
  it("drops a peer's oldest reports past its limit, and any queued longer than the maximum age", async () => {
    const db = beta.relay.db.kysely;
    await sql`DELETE FROM report_queue`.execute(db);
    await sql`INSERT INTO report_queue (iss, jti, queued_at, due_at)
      SELECT 'delta', 'd-' || i, now() - make_interval(secs => 100 - i), now() + interval '1 hour' FROM generate_series(1, 5) AS i`.execute(db);
    await sql`INSERT INTO report_queue (iss, jti, queued_at, due_at) VALUES
      ('epsilon', 'old', now() - interval '8 days', now() + interval '1 hour'),
      ('epsilon', 'new', now(), now() + interval '1 hour')`.execute(db);
    expect(await trimReportQueue(beta.relay.db, { maxAgeSeconds: 7 * 24 * 3600, maxPerPeer: 3 })).toBe(3);
    const left = await sql<{ iss: string; jti: string }>`SELECT iss, jti FROM report_queue ORDER BY iss, jti`.execute(db);
    expect(left.rows).toEqual([
      { iss: "delta", jti: "d-3" }, { iss: "delta", jti: "d-4" }, { iss: "delta", jti: "d-5" }, { iss: "epsilon", jti: "new" },
    ]);
  });
});
