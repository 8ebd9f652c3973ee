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
import { addClient, eventually, grantCapability, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { startJwksEndpoint, type JwksEndpoint } from "../helpers/keys.ts";
import { metricValue } from "../helpers/metrics.ts";
import { runFedrelay, writeConfigFile } from "../helpers/processes.ts";
import { startTcpProxy, type TcpProxy } from "../helpers/tcp-proxy.ts";

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

describe("fedrelay keys rotate, twice, while fanning out", () => {
  let alphaHs: TestHomeserver;
  let betaHs: TestHomeserver;
  let proxy: TcpProxy;
  let alphaId: Identity;
  let alphaConfig: string;

  beforeAll(async () => {
    alphaId = await identity("alpha", "first");
    const betaId = await identity("beta");
    alphaHs = await startHomeserver(alphaId, { natsUrl: nats.url, peers: [betaId], roles: { api: true, worker: false } });
    // beta reaches alpha's JWKS endpoint through a proxy the test can cut.
    proxy = await startTcpProxy({ host: "127.0.0.1", port: Number(new URL(alphaHs.relay.url).port) });
    betaHs = await startHomeserver(betaId, {
      natsUrl: nats.url, peers: [],
      overrides: {
        peers: { alpha: { jwksUrl: new URL("/.well-known/fedrelay/jwks.json", proxy.via(alphaHs.relay.url)).href } },
        jwks: { refreshCooldownSeconds: 1, refreshIntervalSeconds: 1, timeoutMs: 500, retiredGraceSeconds: 2 },
        rateLimits: { enabled: false },
      },
    });
    alphaConfig = await writeConfigFile({ homeserver: "alpha", postgres: { url: alphaHs.db.url, schema: alphaHs.db.schema }, log: { level: "silent" } });
  });
  afterAll(async () => {
    await betaHs?.close();
    await proxy?.close();
    await alphaHs?.close();
  });

  const storedOnBeta = async (): Promise<number> =>
    Number((await betaHs.relay.db.kysely.selectFrom("events").select((eb) => eb.fn.countAll().as("n")).where("iss", "=", "alpha").executeTakeFirstOrThrow()).n);

  it("beta stores all 1,000 events under three keys, none refused, though alpha's JWKS endpoint is down across the second rotation; the first key, leaked, is refused", async () => {
    await addClient(betaHs, "bob");
    const cap = await grantCapability(betaHs, "bob", "g@alpha");
    const fanOut = async (n: number): Promise<void> => {
      for (let i = 0; i < n; i += 10) {
        await Promise.all(Array.from({ length: Math.min(10, n - i) }, async () => {
          const res = await http(`${alphaHs.relay.url}/v1/fanout`, {
            method: "POST", token: SERVICE_TOKEN,
            body: { group: "g@alpha", body: Buffer.from("hi").toString("base64url"), recipients: [{ server: "beta", client: "bob", capability: cap }] },
          });
          if (res.status !== 200) throw new Error(`fan-out: ${res.status} ${JSON.stringify(res.json)}`);
        }));
      }
    };
    const rotate = async (): Promise<string> => {
      const result = await runFedrelay(["keys", "rotate", "--overlap", "2", "--config", alphaConfig]);
      expect(result.stderr).toBe("");
      expect(result.code).toBe(0);
      return /^(alpha#\S+) is served now and signs from /.exec(result.stdout)![1]!;
    };

    await fanOut(300);
    const second = await rotate();
    await fanOut(150);
    await new Promise((r) => setTimeout(r, 2500)); // past the overlap: the new key signs
    await fanOut(150);
    await eventually(async () => (await storedOnBeta()) === 600, 20_000, "600 stored");

    proxy.cut();
    const third = await rotate();
    await new Promise((r) => setTimeout(r, 2500));
    await fanOut(400);
    // Signed by a key beta cannot fetch: they wait, none refused.
    await eventually(async () => metricValue(await betaHs.relay.metrics.registry.metrics(), "fedrelay_events_deferred_total", { peer: "alpha" }) > 0, 10_000, "events waiting for their key");
    expect(await storedOnBeta()).toBe(600);
    proxy.restore();
    await eventually(async () => (await storedOnBeta()) === 1000, 30_000, "all 1,000 stored once the endpoint answers");
    expect(await betaHs.relay.db.kysely.selectFrom("refused_events").select("reason").execute()).toEqual([]);

    const byKey = await betaHs.relay.db.kysely.selectFrom("events").innerJoin("peer_keys", "peer_keys.thumbprint", "events.key_thumbprint")
      .select(["peer_keys.kid", (eb) => eb.fn.countAll().as("n")]).where("events.iss", "=", "alpha").groupBy("peer_keys.kid").execute();
    expect(byKey.map((r) => r.kid).sort()).toEqual(["alpha#first", second, third].sort());
    expect(Number(byKey.find((r) => r.kid === third)?.n)).toBe(400);

    // alpha serves every key, the first two with their exp; the first key, leaked, signs nothing beta accepts.
    const served = (await http(`${alphaHs.relay.url}/.well-known/fedrelay/jwks.json`)).json.keys as { kid: string; exp?: number }[];
    expect(served.map((k) => [k.kid, k.exp !== undefined])).toEqual([["alpha#first", true], [second, true], [third, false]]);
    await new Promise((r) => setTimeout(r, 2500)); // past the grace after beta learned of the retirement
    const leaked = await signed(alphaId, "beta", [{ cid: "bob", cap }], { iat: served[0]!.exp! - 60 });
    const publisher = await natsClient(nats.url);
    await publishEvent(publisher.js, inboxSubject("beta", "alpha"), Buffer.from(leaked.token), 5000).finally(() => publisher.close());
    await eventually(async () => (await betaHs.relay.db.kysely.selectFrom("refused_events").select("reason").execute()).length === 1, 10_000, "the leaked key's event refused");
    expect(await betaHs.relay.db.kysely.selectFrom("refused_events").select(["reason", "detail"]).execute())
      .toEqual([{ reason: "unknown_key", detail: expect.stringMatching(/^key alpha#first is retired/) }]);
  });

  it("keys list says which key signs; a rotation that would end before a pending one is refused; a bad --overlap exits 2", async () => {
    const pending = await runFedrelay(["keys", "rotate", "--overlap", "600", "--config", alphaConfig]);
    expect(pending.code).toBe(0);
    const early = await runFedrelay(["keys", "rotate", "--overlap", "0", "--config", alphaConfig]);
    expect([early.code, early.stderr]).toEqual([1, expect.stringMatching(/^fedrelay keys: alpha#\S+ signs from .*, after this rotation's .*: give --overlap that ends after it\n$/)]);
    const bad = await runFedrelay(["keys", "rotate", "--overlap=-5", "--config", alphaConfig]);
    expect([bad.code, bad.stderr]).toEqual([2, "fedrelay keys: --overlap must be whole seconds from 0 to 2592000, got \"-5\"\n"]);
    const list = JSON.parse((await runFedrelay(["keys", "list", "--config", alphaConfig])).stdout) as { kid: string; signing: boolean; retiredAt: string | null }[];
    // The pending key last, not signing yet and not retired; the one before it signs until then; every other is retired.
    expect(list.length).toBeGreaterThanOrEqual(2);
    expect(list.filter((k) => k.signing).map((k) => k.kid)).toEqual([list.at(-2)!.kid]);
    expect(list.map((k) => k.retiredAt === null)).toEqual([...list.slice(0, -1).map(() => false), true]);
  });
});
