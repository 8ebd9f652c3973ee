/**
 * A peer known by its JWKS URL rotates its key while fanning out, and its JWKS
 * endpoint is down for part of the run: a real beta (NATS, Postgres, a worker)
 * stores every event once and refuses none, and another peer's events go on
 * meanwhile (src/keys/registry.ts: a lookup never waits for a fetch).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { compactVerify, importJWK } from "jose";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { evidenceOf } from "../../src/operations/evidence.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { addClient, eventually, grantCapability, identity, natsClient, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { startJwksEndpoint, type JwksEndpoint } from "../helpers/keys.ts";
import { metricValue } from "../helpers/metrics.ts";

let nats: LocalNats;
let jwks: JwksEndpoint;

beforeAll(async () => {
  nats = await startLocalNats();
  jwks = await startJwksEndpoint();
});

afterAll(async () => {
  await jwks?.close();
  await nats?.stop();
});

describe("a peer that rotates while its key set cannot be fetched", () => {
  let beta: TestHomeserver;
  let client: NatsClient;
  let alpha: Identity[];
  let gamma: Identity;
  let cap: string;

  beforeAll(async () => {
    alpha = await Promise.all(["k1", "k2", "k3"].map((k) => identity("alpha", k)));
    gamma = await identity("gamma");
    beta = await startHomeserver(await identity("beta"), {
      natsUrl: nats.url, peers: [gamma],
      overrides: {
        peers: { alpha: { jwksUrl: jwks.url }, gamma: { keys: [gamma.publicJwk] } },
        // A short grace, so the end of the test can show a retired key refused.
        jwks: { refreshCooldownSeconds: 1, timeoutMs: 500, retiredGraceSeconds: 2 },
        // 1,000 events to one client: its buckets are not what this test is about.
        rateLimits: { enabled: false },
      },
    });
    client = await natsClient(nats.url);
    await addClient(beta, "bob");
    cap = await grantCapability(beta, "bob", "g@alpha");
  });
  afterAll(async () => {
    await client?.close();
    await beta?.close();
  });

  const publish = async (from: Identity, n: number): Promise<string[]> => {
    const jtis: string[] = [];
    for (let i = 0; i < n; i += 50) {
      await Promise.all(Array.from({ length: Math.min(50, n - i) }, async () => {
        const event = await signed(from, "beta", [{ cid: "bob", cap }]);
        jtis.push(event.claims.jti);
        await publishEvent(client.js, inboxSubject("beta", from.name), Buffer.from(event.token), 5000);
      }));
    }
    return jtis;
  };
  const stored = async (iss: string): Promise<number> =>
    Number((await beta.relay.db.kysely.selectFrom("events").select((eb) => eb.fn.countAll().as("n")).where("iss", "=", iss).executeTakeFirstOrThrow()).n);
  const refused = async (): Promise<unknown[]> => beta.relay.db.kysely.selectFrom("refused_events").select(["reason", "detail"]).execute();

  it("stores all 1,000 of alpha's events across two rotations, none refused, while gamma's go on through the outage; every bundle verifies with jose; the retired key, leaked, is refused", async () => {
    // k1, known from the first fetch.
    jwks.keys = [alpha[0]!.publicJwk];
    await publish(alpha[0]!, 300);
    await eventually(async () => (await stored("alpha")) === 300, 20_000, "k1's 300 stored");

    // First rotation: k2 is served before it signs, as a rotation should, and k1 is retired.
    const k1RetiredAt = Math.floor(Date.now() / 1000);
    const retiredK1 = { ...alpha[0]!.publicJwk, exp: k1RetiredAt };
    jwks.keys = [retiredK1, alpha[1]!.publicJwk];
    await publish(alpha[1]!, 300);
    await eventually(async () => (await stored("alpha")) === 600, 20_000, "k2's 300 stored");

    // Second rotation while the endpoint is down: k3's events wait in the inbox, none refused,
    // and gamma's events are stored meanwhile.
    jwks.mode = "down";
    jwks.keys = [retiredK1, { ...alpha[1]!.publicJwk, exp: Math.floor(Date.now() / 1000) }, alpha[2]!.publicJwk];
    await publish(alpha[2]!, 400);
    await eventually(async () => (metricValue(await beta.relay.metrics.registry.metrics(), "fedrelay_jwks_fetch_failures_total", { peer: "alpha" })) >= 2, 10_000, "fetches failing");
    await publish(gamma, 20);
    await eventually(async () => (await stored("gamma")) === 20, 10_000, "gamma's 20 stored during alpha's outage");
    expect(await stored("alpha")).toBe(600);
    expect(await refused()).toEqual([]);
    expect(metricValue(await beta.relay.metrics.registry.metrics(), "fedrelay_events_deferred_total", { peer: "alpha" })).toBeGreaterThan(0);

    jwks.mode = "serve";
    await eventually(async () => (await stored("alpha")) === 1000, 30_000, "k3's 400 stored once the endpoint answers");
    expect(await refused()).toEqual([]);

    // Every stored event's evidence bundle verifies with jose alone, under the key that signed it.
    const signers = new Map<string, number>();
    for (const { jti } of await beta.relay.db.kysely.selectFrom("events").select("jti").where("iss", "=", "alpha").execute()) {
      const evidence = await evidenceOf(jti, "alpha")(beta.relay.db, "beta");
      if (evidence.kept !== "token") throw new Error(`event ${jti} was kept as a record`);
      const { protectedHeader } = await compactVerify(evidence.bundle.token, await importJWK(evidence.bundle.jwk, "EdDSA"), { algorithms: ["EdDSA"] });
      expect(protectedHeader.kid).toBe(evidence.bundle.jwk.kid);
      signers.set(evidence.bundle.jwk.kid, (signers.get(evidence.bundle.jwk.kid) ?? 0) + 1);
    }
    expect(Object.fromEntries(signers)).toEqual({ "alpha#k1": 300, "alpha#k2": 300, "alpha#k3": 400 });

    // k1 leaks after its retirement: an event signed with it, dated inside its window, is refused.
    const leaked = await signed(alpha[0]!, "beta", [{ cid: "bob", cap }], { iat: k1RetiredAt - 60, exp: k1RetiredAt + 3600 });
    await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(leaked.token), 5000);
    await eventually(async () => (await refused()).length === 1, 10_000, "the leaked key's event refused");
    expect(await refused()).toEqual([{ reason: "unknown_key", detail: expect.stringMatching(/^key alpha#k1 is retired: it verifies only events received before /) }]);
    expect(await stored("alpha")).toBe(1000);
  });
});
