/**
 * The per-peer view (issue 15): after a mixed run, each configured peer's
 * events received, accepted, refused by reason and its backlog are what was
 * sent, and every sender nobody configured counts as one label, "other".
 * Then the same worker deletes what was refused once it is past retention.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { signEvent } from "../../src/protocol/sign.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { eventually, identity, natsClient, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { metricValue } from "../helpers/metrics.ts";

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity;
let gamma: Identity;
let delta: Identity;
let beta: TestHomeserver;

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  [alpha, gamma, delta] = await Promise.all([identity("alpha"), identity("gamma"), identity("delta")]);
  beta = await startHomeserver(await identity("beta"), {
    natsUrl: nats.url, peers: [alpha, gamma],
    overrides: { nats: { servers: [nats.url], checkIntervalSeconds: 1 }, retention: { refusedSeconds: 3600, pruneIntervalSeconds: 1 } },
  });
});

afterAll(async () => {
  await client?.close();
  await beta?.close();
  await nats?.stop();
});

const publish = (from: Identity, token: string): Promise<void> =>
  publishEvent(client.js, inboxSubject("beta", from.name), Buffer.from(token, "latin1"), 5000).then(() => undefined);

describe("per-peer metrics after a mixed run", () => {
  it("count each configured peer's events by outcome and reason, and every other sender as other", async () => {
    // alpha: 10 stored (as records: nobody here receives them).
    let alphaBytes = 0;
    for (let i = 0; i < 10; i++) {
      const { token } = await signed(alpha, "beta", [{ cid: "nobody" }], { jti: `a-${i}` });
      alphaBytes += token.length;
      await publish(alpha, token);
    }
    // gamma: 1 stored, the same event signed again (a duplicate), 3 with a broken signature.
    const first = await signed(gamma, "beta", [{ cid: "nobody" }], { jti: "g-1" });
    await publish(gamma, first.token);
    await eventually(async () => (await sql<{ n: string }>`SELECT count(*) AS n FROM events WHERE iss = 'gamma'`.execute(beta.relay.db.kysely)).rows[0]!.n === "1", 10_000, "gamma's first stored");
    await publish(gamma, await signEvent({ ...first.claims, iat: first.claims.iat - 1 }, gamma.key));
    for (let i = 0; i < 3; i++) {
      const { token } = await signed(gamma, "beta", [{ cid: "nobody" }], { jti: `g-bad-${i}` });
      await publish(gamma, `${token.slice(0, -4)}AAAA`);
    }
    // delta, configured nowhere: 2, refused as unknown.
    for (let i = 0; i < 2; i++) await publish(delta, (await signed(delta, "beta", [{ cid: "nobody" }], { jti: `d-${i}` })).token);

    const jsm = await jetstreamManager(client.nc);
    await eventually(async () => (await jsm.streams.info(inboxStreamName("beta"))).state.messages === 0, 15_000, "the inbox drained");
    // The backlog gauge is measured every nats.checkIntervalSeconds (1 s here): wait for one after the drain.
    await new Promise((r) => setTimeout(r, 1500));

    const text = await beta.relay.metrics.registry.metrics();
    const value = (name: string, labels: Record<string, string>): number => metricValue(text, name, labels);
    expect({
      received: { alpha: value("fedrelay_events_received_total", { peer: "alpha" }), gamma: value("fedrelay_events_received_total", { peer: "gamma" }), other: value("fedrelay_events_received_total", { peer: "other" }) },
      accepted: { alpha: value("fedrelay_events_accepted_total", { peer: "alpha" }), gamma: value("fedrelay_events_accepted_total", { peer: "gamma" }), other: value("fedrelay_events_accepted_total", { peer: "other" }) },
      refused: {
        gammaDuplicate: value("fedrelay_events_refused_total", { peer: "gamma", reason: "duplicate" }),
        gammaBadSignature: value("fedrelay_events_refused_total", { peer: "gamma", reason: "bad_signature" }),
        otherUnknown: value("fedrelay_events_refused_total", { peer: "other", reason: "unknown_sender" }),
        alpha: value("fedrelay_events_refused_total", { peer: "alpha" }),
      },
      backlog: { alpha: value("fedrelay_peer_backlog_events", { peer: "alpha" }), gamma: value("fedrelay_peer_backlog_events", { peer: "gamma" }) },
      lagObserved: { alpha: value("fedrelay_peer_commit_lag_seconds_count", { peer: "alpha" }) > 0, gamma: value("fedrelay_peer_commit_lag_seconds_count", { peer: "gamma" }) > 0 },
      storedBytes: {
        alphaRecord: value("fedrelay_peer_stored_bytes_total", { peer: "alpha", kept: "record" }),
        gammaRecord: value("fedrelay_peer_stored_bytes_total", { peer: "gamma", kept: "record" }),
        body: value("fedrelay_peer_stored_bytes_total", { kept: "body" }),
        other: value("fedrelay_peer_stored_bytes_total", { peer: "other" }),
      },
    }).toEqual({
      received: { alpha: 10, gamma: 5, other: 2 },
      accepted: { alpha: 10, gamma: 1, other: 0 },
      refused: { gammaDuplicate: 1, gammaBadSignature: 3, otherUnknown: 2, alpha: 0 },
      backlog: { alpha: 0, gamma: 0 },
      lagObserved: { alpha: true, gamma: true },
      // The events' sizes as they arrived, though only records of them were kept; the duplicate stored nothing.
      storedBytes: { alphaRecord: alphaBytes, gammaRecord: first.token.length, body: 0, other: 0 },
    });
    // A sender nobody configured never gets a label of its own.
    expect(text).not.toMatch(/peer="delta"/);
  });
});

describe("retention in a running worker", () => {
  it("deletes the records and refused events of the run above once past retention.refusedSeconds and expired, and nothing sooner", async () => {
    const db = beta.relay.db.kysely;
    const count = async (table: "events" | "refused_events"): Promise<number> =>
      Number((await sql<{ n: string }>`SELECT count(*) AS n FROM ${sql.table(table)}`.execute(db)).rows[0]!.n);
    // 11 records (alpha's 10 and gamma's first) and 5 refused outright (3 bad signatures, 2 unknown senders).
    expect({ records: await count("events"), refused: await count("refused_events") }).toEqual({ records: 11, refused: 5 });
    // Past retention but not expired yet: kept (two prune rounds go by).
    await sql`UPDATE events SET received_at = now() - interval '2 hours'`.execute(db);
    await new Promise((r) => setTimeout(r, 2500));
    expect(await count("events")).toBe(11);
    await sql`UPDATE events SET expires_at = now() - interval '1 hour'`.execute(db);
    await sql`UPDATE refused_events SET at = now() - interval '2 hours'`.execute(db);
    await eventually(async () => (await count("events")) === 0 && (await count("refused_events")) === 0, 10_000, "records and refused events deleted");
    const text = await beta.relay.metrics.registry.metrics();
    expect(metricValue(text, "fedrelay_refused_pruned_total", { table: "events" })).toBe(11);
    expect(metricValue(text, "fedrelay_refused_pruned_total", { table: "refused_events" })).toBe(5);
  });
});
