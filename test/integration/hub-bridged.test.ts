/**
 * Bridged homeservers (issue 14): each runs its own nats-server with its own
 * JetStream domain, a leafnode of the hub. Fan-out crosses the bridge; while a
 * link is down, events for its homeserver wait at the hub and events it sends
 * wait in its outbox; after the link returns every event is stored once. An
 * outage longer than an event's lifetime loses nothing either.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { storedClaims } from "../../src/protocol/claims.ts";
import {
  addClient, eventually, grantCapability, http, identity, SERVICE_TOKEN, startHomeserver,
  type Identity, type TestHomeserver,
} from "../helpers/federation.ts";
import { startHub, type Hub } from "../helpers/hub.ts";

let hub: Hub;
let alpha: Identity, beta: Identity;
let alphaHs: TestHomeserver, betaHs: TestHomeserver;
/** Alpha's clock runs this many seconds from the wall clock (an injected clock, for the outage tests). */
let alphaOffset = 0;
let betaOffset = 0;

const GROUP_ALPHA = "climbing@alpha";
const GROUP_BETA = "rowing@beta";
const caps = new Map<string, string>();

beforeAll(async () => {
  hub = await startHub({ alpha: "bridged", beta: "bridged" });
  [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
  // Short lifetimes (the least the config allows), so the outage tests run in seconds of clock.
  const settings = async (name: string) => {
    const s = await hub.relaySettings(name);
    return {
      ...s,
      fanout: { ...(s.fanout as object), eventLifetimeSeconds: 60, resignWithinSeconds: 30, publishTimeoutMs: 2000 },
      worker: { ...(s.worker as object), retryDelayMs: 200 },
      // 2,000 events to one client in seconds: far over a client's rate limit, which is not what this tests.
      rateLimits: { enabled: false },
    };
  };
  alphaHs = await startHomeserver(alpha, { natsUrl: hub.leaf("alpha").url, peers: [beta], overrides: await settings("alpha"), now: () => Date.now() / 1000 + alphaOffset });
  betaHs = await startHomeserver(beta, { natsUrl: hub.leaf("beta").url, peers: [alpha], overrides: await settings("beta"), now: () => Date.now() / 1000 + betaOffset });
  await addClient(betaHs, "bob");
  await addClient(alphaHs, "ann");
  caps.set("bob", await grantCapability(betaHs, "bob", GROUP_ALPHA));
  caps.set("ann", await grantCapability(alphaHs, "ann", GROUP_BETA));
});

afterAll(async () => {
  await betaHs?.close();
  await alphaHs?.close();
  await hub?.stop();
});

function fanout(from: TestHomeserver, id: string) {
  const [group, server, client] = from === alphaHs ? [GROUP_ALPHA, "beta", "bob"] : [GROUP_BETA, "alpha", "ann"];
  return http(`${from.relay.url}/v1/fanout`, {
    method: "POST", token: SERVICE_TOKEN,
    body: { id, group, body: Buffer.from(id).toString("base64url"), recipients: [{ server, client, capability: caps.get(client)! }] },
  });
}

async function storedFrom(hs: TestHomeserver, iss: string, prefix: string): Promise<{ jti: string; token: string }[]> {
  return hs.relay.db.kysely.selectFrom("events").select(["jti", "token"]).where("iss", "=", iss).where("jti", "like", `${prefix}%`).execute();
}

async function deliveriesFrom(hs: TestHomeserver, iss: string, prefix: string): Promise<number> {
  const row = await hs.relay.db.kysely.selectFrom("deliveries").select((eb) => eb.fn.countAll<string>().as("n"))
    .where("iss", "=", iss).where("jti", "like", `${prefix}%`).executeTakeFirstOrThrow();
  return Number(row.n);
}

describe("fan-out across the bridge", () => {
  it("an owner whose own link is down gets success from POST /v1/fanout; its events arrive once the link is back", async () => {
    hub.link("alpha").cut();
    try {
      for (let i = 0; i < 10; i++) {
        const res = await fanout(alphaHs, `down-${i}`);
        expect({ i, status: res.status }).toEqual({ i, status: 200 });
        expect(res.json.events).toEqual([expect.objectContaining({ server: "beta", published: true, outbox: true })]);
      }
      await new Promise((r) => setTimeout(r, 1500));
      expect(await storedFrom(betaHs, "alpha", "down-")).toEqual([]);
    } finally {
      hub.link("alpha").restore();
    }
    await eventually(async () => (await storedFrom(betaHs, "alpha", "down-")).length === 10, 30_000, "the 10 events at beta");
    expect(await deliveriesFrom(betaHs, "alpha", "down-")).toBe(10);
  });

  it("2,000 events each way while each link is cut twice: every event stored exactly once", async () => {
    const N = 2000;
    const cuts: [at: number, who: "alpha" | "beta"][] = [[300, "alpha"], [700, "beta"], [1100, "alpha"], [1500, "beta"]];
    const statuses: number[] = [];
    let sent = 0;
    const send = async (i: number): Promise<void> => {
      const [a, b] = await Promise.all([fanout(alphaHs, `run-${i}`), fanout(betaHs, `run-${i}`)]);
      statuses.push(a.status, b.status);
    };
    for (let batch = 0; batch < N; batch += 50) {
      const cut = cuts.find(([at]) => at === batch);
      if (cut) {
        hub.link(cut[1]).cut();
        setTimeout(() => hub.link(cut[1]).restore(), 1500);
      }
      await Promise.all(Array.from({ length: 50 }, (_, k) => send(batch + k)));
      sent += 50;
    }
    expect(sent).toBe(N);
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    await eventually(async () => (await storedFrom(betaHs, "alpha", "run-")).length === N && (await storedFrom(alphaHs, "beta", "run-")).length === N, 120_000, "2,000 events each way");
    // The cuts happened while events were on their way: each outbox had deliveries fail and retried.
    for (const hs of [alphaHs, betaHs]) {
      const failures = (await hs.relay.metrics.outboxFailures.get()).values.reduce((n, v) => n + v.value, 0);
      expect(failures).toBeGreaterThan(0);
    }
    // Exactly once: one stored event and one delivery per id, on both sides.
    for (const [hs, iss] of [[betaHs, "alpha"], [alphaHs, "beta"]] as const) {
      const events = await storedFrom(hs, iss, "run-");
      expect(new Set(events.map((e) => e.jti)).size).toBe(N);
      expect(await deliveriesFrom(hs, iss, "run-")).toBe(N);
    }
  });
});

describe("a bridged homeserver's own server", () => {
  it("lets only its relay in, with the homeserver's own key", async () => {
    const { connect } = await import("@nats-io/transport-node");
    await expect(connect({ servers: hub.leaf("alpha").url, reconnect: false })).rejects.toThrow(/Authorization Violation/i);
  });

  it("forwards from its outbox only what its homeserver signed for that destination: a forged event there is dropped", async () => {
    const { connect, nkeyAuthenticator } = await import("@nats-io/transport-node");
    const { jetstream } = await import("@nats-io/jetstream");
    const { signEvent } = await import("../../src/protocol/sign.ts");
    const { importSigningKey } = await import("../../src/protocol/keys.ts");
    // Someone holding alpha's NATS credential, but not its signing key: beta's key under alpha's kid.
    const nc = await connect({ servers: hub.leaf("alpha").url, authenticator: nkeyAuthenticator(new TextEncoder().encode(hub.keys.homeservers.get("alpha")!.seed!)) });
    try {
      const now = Math.floor(Date.now() / 1000);
      const forged = await signEvent({
        iss: "alpha", aud: "beta", jti: "forged-outbox", iat: now - 3600, exp: now + 10, grp: GROUP_ALPHA,
        rcpt: [{ cid: "bob", cap: caps.get("bob")! }], body: Buffer.from("send me your password").toString("base64url"),
      }, importSigningKey({ ...beta.jwk, kid: alpha.key.kid }));
      await jetstream(nc).publish("fedrelay.v1.outbox.beta.alpha", forged);
      const honest = await fanout(alphaHs, "after-forgery");
      expect(honest.status).toBe(200);
      await eventually(async () => (await storedFrom(betaHs, "alpha", "after-forgery")).length === 1, 30_000, "the honest event at beta");
      expect(await storedFrom(betaHs, "alpha", "forged-")).toEqual([]);
      const refused = await betaHs.relay.db.kysely.selectFrom("refused_events").select("claimed_jti").where("claimed_jti", "=", "forged-outbox").execute();
      expect(refused).toEqual([]);
    } finally {
      await nc.close();
    }
  });
});

describe("another homeserver's server", () => {
  it("taking alpha's server name on its own leafnode does not disturb alpha's link", async () => {
    const { readFile } = await import("node:fs/promises");
    const { connect, nkeyAuthenticator } = await import("@nats-io/transport-node");
    const { jetstreamManager } = await import("@nats-io/jetstream");
    const { freePort, startLocalNats } = await import("../../src/local-nats.ts");
    // Beta's operator starts a second server of its own, named as alpha's is (nats-config's names are predictable).
    const conf = JSON.parse((await readFile(`${hub.dir}/homeservers/beta/nats-server.conf`, "utf8")).replace(/^#.*$/gm, "")) as Record<string, unknown> & { jetstream: Record<string, unknown> };
    conf.server_name = "alpha-leaf";
    conf.listen = `127.0.0.1:${await freePort()}`;
    conf.jetstream.store_dir = `${hub.dir}/impostor-js`;
    const impostor = await startLocalNats({ config: JSON.stringify(conf) });
    const nc = await connect({ servers: hub.leaf("alpha").url, authenticator: nkeyAuthenticator(new TextEncoder().encode(hub.keys.homeservers.get("alpha")!.seed!)), inboxPrefix: "_INBOX_alpha" });
    try {
      const jsm = await jetstreamManager(nc, { apiPrefix: "HUBJS.API", checkAPI: false });
      const failures: string[] = [];
      for (const until = Date.now() + 3000; Date.now() < until;) {
        await jsm.streams.info("FEDRELAY_IN_alpha").catch((err: Error) => failures.push(err.message));
        await new Promise((r) => setTimeout(r, 25));
      }
      expect(failures).toEqual([]);
    } finally {
      await nc.close();
      await impostor.stop();
    }
  });
});

describe("outages longer than an event's lifetime lose nothing", () => {
  it("a destination judges expiry by when the hub stored the event: beta, back after two days (its clock), accepts what waited for it", async () => {
    hub.link("beta").cut();
    try {
      for (let i = 0; i < 5; i++) expect((await fanout(alphaHs, `late-${i}`)).status).toBe(200);
      // Stored at the hub within their 60-second lifetime; beta comes back two days later.
      await new Promise((r) => setTimeout(r, 1000));
      betaOffset = 2 * 86_400;
    } finally {
      hub.link("beta").restore();
    }
    try {
      // Events a pull had in flight when the link went down come again after ack_wait (10 s on this hub).
      await eventually(async () => (await storedFrom(betaHs, "alpha", "late-")).length === 5, 60_000, "the five events at beta");
      const refused = await betaHs.relay.db.kysely.selectFrom("refused_events").select("reason").execute();
      expect(refused).toEqual([]);
    } finally {
      betaOffset = 0;
    }
  });

  it("a sender's outbox signs again, with the same jti, an event whose lifetime ran out while its link was down", async () => {
    hub.link("alpha").cut();
    // Fanned out two days ago (alpha's clock), when its link went down: the signed lifetime is long past.
    alphaOffset = -2 * 86_400;
    try {
      const res = await fanout(alphaHs, "stale-1");
      expect(res.status).toBe(200);
    } finally {
      alphaOffset = 0;
      await new Promise((r) => setTimeout(r, 500));
      hub.link("alpha").restore();
    }
    const [stored] = await eventually(async () => {
      const rows = await storedFrom(betaHs, "alpha", "stale-");
      return rows.length === 1 && rows;
    }, 30_000, "the stale event at beta");
    const claims = storedClaims(stored!.token);
    expect(claims.jti).toBe("stale-1");
    // Signed again now, by the forwarder: not two days ago.
    expect(Math.abs(claims.iat - Date.now() / 1000)).toBeLessThan(60);
    expect((await alphaHs.relay.metrics.outboxResigned.get()).values[0]?.value).toBeGreaterThanOrEqual(1);
  });
});
