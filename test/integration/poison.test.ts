/**
 * Failures are classified at the consumer's edge (issue 15): a message whose
 * commit fails the same way every time is found by splitting its batch,
 * recorded as unprocessable and terminated, while every other message of the
 * batch commits exactly once; nothing loops.
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { eventually, identity, natsClient, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";

let nats: LocalNats;
let alpha: Identity;
let beta: TestHomeserver;
let client: NatsClient;

beforeAll(async () => {
  nats = await startLocalNats();
  alpha = await identity("alpha");
  beta = await startHomeserver(await identity("beta"), {
    natsUrl: nats.url, peers: [alpha],
    overrides: { faults: { commitFailsFor: ["poison"] }, worker: { batchSize: 16, retryDelayMs: 100 } },
  });
  client = await natsClient(nats.url);
});

afterAll(async () => {
  await client?.close();
  await beta?.close();
  await nats?.stop();
});

describe("a message whose commit always fails", () => {
  it("is recorded as unprocessable and terminated; the other 99 of its stream commit exactly once", async () => {
    const jtis = Array.from({ length: 100 }, (_, i) => (i === 37 ? "poison" : `ok-${i}`));
    // Published together, so the poison shares its batches with honest events.
    await Promise.all(jtis.map(async (jti) => {
      const { token } = await signed(alpha, "beta", [{ cid: "nobody" }], { jti });
      await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(token, "latin1"), 5000);
    }));
    const jsm = await jetstreamManager(client.nc);
    await eventually(async () => (await jsm.streams.info(inboxStreamName("beta"))).state.messages === 0, 20_000, "the inbox drained");
    const events = await beta.relay.db.kysely.selectFrom("events").select("jti").execute();
    expect(events.map((e) => e.jti).sort()).toEqual(jtis.filter((j) => j !== "poison").sort());
    const refused = await beta.relay.db.kysely.selectFrom("refused_events").select(["reason", "claimed_jti", "detail"]).execute();
    expect(refused).toEqual([{ reason: "unprocessable", claimed_jti: "poison", detail: expect.stringMatching(/injected fault: the commit of poison fails/) }]);
    const metric = (await beta.relay.metrics.eventsRefused.get()).values.find((v) => v.labels.reason === "unprocessable")?.value;
    expect(metric).toBe(1);
    expect((await fetch(`${beta.relay.url}/readyz`, { headers: { authorization: "Bearer test-service-token-0123456789" } })).status).toBe(200);
  });
});
