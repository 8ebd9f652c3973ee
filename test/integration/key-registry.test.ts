import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createKeyRegistry } from "../../src/keys/registry.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { addClient, eventually, grantCapability, http, identity, natsClient, signed, startHomeserver, type Identity } from "../helpers/federation.ts";

/** A peer's JWKS endpoint whose keys the test changes, counting fetches. */
let server: Server;
let served: object[] = [];
let fetches = 0;
let jwksUrl = "";

beforeAll(async () => {
  server = createServer((_req, res) => {
    fetches += 1;
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify({ keys: served }));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  jwksUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/fedrelay/jwks.json`;
});
afterAll(() => new Promise<void>((r) => server.close(() => r())));

describe("the key registry resolves peers' keys", () => {
  let alpha: Identity, alpha2: Identity, gamma: Identity;
  beforeAll(async () => {
    [alpha, alpha2, gamma] = await Promise.all([identity("alpha", "k1"), identity("alpha", "k2"), identity("gamma")]);
  });

  it("fetches a peer's JWKS on first use, refetches on an unknown kid, and respects the cooldown", async () => {
    served = [alpha.publicJwk];
    fetches = 0;
    let now = 1_000_000;
    const registry = createKeyRegistry({ self: { homeserver: "beta", keys: [] }, peers: { alpha: { jwksUrl } }, cooldownSeconds: 60, now: () => now });
    expect((await registry.resolve("alpha#k1"))?.kid).toBe("alpha#k1");
    expect(fetches).toBe(1);

    // alpha rotates: the new kid is unknown, so one refetch finds it.
    served = [alpha.publicJwk, alpha2.publicJwk];
    now += 61;
    expect((await registry.resolve("alpha#k2"))?.kid).toBe("alpha#k2");
    expect(fetches).toBe(2);

    // A flood of forged kids within the cooldown costs no further requests.
    for (let i = 0; i < 20; i++) expect(await registry.resolve(`alpha#forged${i}`)).toBeUndefined();
    expect(fetches).toBe(2);
    // Known keys never need a fetch, and stay after the peer drops them (retired keys still verify old events).
    served = [];
    now += 61;
    expect((await registry.resolve("alpha#k1"))?.kid).toBe("alpha#k1");
    expect(fetches).toBe(2);
  });

  it("ignores keys in a peer's JWKS that name another homeserver", async () => {
    served = [alpha.publicJwk, gamma.publicJwk];
    const registry = createKeyRegistry({
      self: { homeserver: "beta", keys: [] }, peers: { alpha: { jwksUrl }, gamma: { keys: [] } }, cooldownSeconds: 60,
    });
    expect(await registry.resolve("alpha#k1")).toBeDefined();
    expect(await registry.resolve("gamma#k1")).toBeUndefined();
    expect(registry.isKnown("gamma")).toBe(true);
    expect(registry.isKnown("delta")).toBe(false);
  });
});

describe("a homeserver that knows its peer only by JWKS URL", () => {
  let nats: LocalNats;
  beforeAll(async () => { nats = await startLocalNats(); });
  afterAll(async () => { await nats?.stop(); });

  it("verifies the peer's events with keys fetched from the peer's own relay", async () => {
    const [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
    const alphaHs = await startHomeserver(alpha, { natsUrl: nats.url, peers: [], roles: { api: true, worker: false } });
    const betaHs = await startHomeserver(beta, {
      natsUrl: nats.url, peers: [],
      overrides: { peers: { alpha: { jwksUrl: `${alphaHs.relay.url}/.well-known/fedrelay/jwks.json` } } },
    });
    const client = await natsClient(nats.url);
    try {
      const token = await addClient(betaHs, "bob");
      const event = await signed(alpha, "beta", [{ cid: "bob", cap: await grantCapability(betaHs, "bob", "g@alpha") }]);
      await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(event.token), 5000);
      const got = await eventually(async () => {
        const res = await http(`${betaHs.relay.url}/v1/messages`, { token });
        const list = res.json.messages as { event: string }[];
        return list.length > 0 && list;
      });
      expect(got.map((m) => m.event)).toEqual([event.claims.jti]);
    } finally {
      await client.close();
      await betaHs.close();
      await alphaHs.close();
    }
  });
});
