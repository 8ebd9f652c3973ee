/**
 * Bridged homeservers (issue 14): each runs its own nats-server with its own
 * JetStream domain, a leafnode of the hub. Fan-out crosses the bridge; while a
 * link is down, events for its homeserver wait at the hub and events it sends
 * wait in its outbox; after the link returns every event is stored once. An
 * outage longer than an event's lifetime loses nothing either. And a leafnode,
 * which a hub lets name `$JS.ACK.…` replies, cannot reach another homeserver's
 * consumers with them.
 */
import { jetstream, type JsMsg } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { adminManager } from "../../src/federation/provision.ts";
import { storedClaims } from "../../src/protocol/claims.ts";
import {
  addClient, eventually, grantCapability, http, identity, SERVICE_TOKEN, startHomeserver,
  type Identity, type TestHomeserver,
} from "../helpers/federation.ts";
import { rawLeaf, startHub, type Hub, type RawLeaf } from "../helpers/hub.ts";

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

async function storedFrom(hs: TestHomeserver, iss: string, prefix: string): Promise<{ jti: string; token: string | null }[]> {
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
    expect(stored!.token, "stored with its body (delivered to bob)").not.toBeNull();
    const claims = storedClaims(stored!.token!);
    expect(claims.jti).toBe("stale-1");
    // Signed again now, by the forwarder: not two days ago.
    expect(Math.abs(claims.iat - Date.now() / 1000)).toBeLessThan(60);
    expect((await alphaHs.relay.metrics.outboxResigned.get()).values[0]?.value).toBeGreaterThanOrEqual(1);
  });
});

describe("a bridged homeserver's leafnode cannot reach another homeserver's consumers", () => {
  // A hub of its own, with no relays: what happens to gamma's streams is NATS's doing alone.
  let hub3: Hub;
  let evil: RawLeaf;
  let gammaNc: NatsConnection;
  const pending: JsMsg[] = [];

  beforeAll(async () => {
    hub3 = await startHub({ alpha: "shared", beta: "bridged", gamma: "shared" });
    // Alpha sends gamma five events and three reports; gamma pulls them and has not acknowledged them yet.
    const alphaNc = await hub3.connectAs("alpha");
    try {
      const js = jetstream(alphaNc);
      for (let i = 1; i <= 5; i++) await js.publish("fedrelay.v1.inbox.gamma.alpha", `event ${i}`);
      for (let i = 1; i <= 3; i++) await js.publish("fedrelay.v1.report.gamma.alpha", `report ${i}`);
    } finally {
      await alphaNc.close();
    }
    gammaNc = await hub3.connectAs("gamma");
    const gammaJs = jetstream(gammaNc, { apiPrefix: "HUBJS.API" });
    for (const [stream, consumer, n] of [["FEDRELAY_IN_gamma", "receiver_alpha", 5], ["FEDRELAY_REPORTS_gamma", "reports", 3]] as const) {
      const batch = await (await gammaJs.consumers.get(stream, consumer)).fetch({ max_messages: n, expires: 2000 });
      for await (const m of batch) pending.push(m);
    }
    // Beta's operator, with beta's own seed, speaks the leafnode protocol to the hub beside its server.
    evil = await rawLeaf(hub3.federation.hub.nodes[0]!.leafnodePort, hub3.keys.homeservers.get("beta")!.seed!);
  });

  afterAll(async () => {
    evil?.close();
    await gammaNc?.close();
    await hub3?.stop();
  });

  /** Gamma's streams and consumers as the hub operator sees them. */
  async function gammaState(): Promise<object> {
    const admin = await hub3.connectAdmin();
    try {
      const jsm = await adminManager(admin, "gamma");
      const consumer = async (stream: string, name: string) => {
        const c = await jsm.consumers.info(stream, name);
        return { pending: c.num_ack_pending, waiting: c.num_waiting, redelivered: c.num_redelivered, delivered: c.delivered.stream_seq };
      };
      const bySubject = async (stream: string) => (await jsm.streams.info(stream, { subjects_filter: ">" })).state.subjects ?? {};
      return {
        // Alpha's; beta's junk stays on beta's subject.
        events: (await bySubject("FEDRELAY_IN_gamma"))["fedrelay.v1.inbox.gamma.alpha"] ?? 0,
        reports: (await bySubject("FEDRELAY_REPORTS_gamma"))["fedrelay.v1.report.gamma.alpha"] ?? 0,
        receiver: await consumer("FEDRELAY_IN_gamma", "receiver_alpha"),
        reportConsumer: await consumer("FEDRELAY_REPORTS_gamma", "reports"),
      };
    } finally {
      await admin.close();
    }
  }

  it("JetStream answers to beta's own pulls, and to its publishes, with gamma's ack subjects as replies, neither ack, term, nak nor pull there", async () => {
    expect(pending).toHaveLength(8);
    const before = await gammaState();
    expect(before).toEqual({
      events: 5, reports: 3,
      receiver: { pending: 5, waiting: 0, redelivered: 0, delivered: 5 },
      reportConsumer: { pending: 3, waiting: 0, redelivered: 0, delivered: 3 },
    });
    const acks = (s: number) => [`$JS.ACK.FEDRELAY_IN_gamma.receiver_alpha.1.${s}.${s}.0.0`, `$JS.ACK.FEDRELAY_REPORTS_gamma.reports.1.${s}.${s}.0.0`];
    const NEXT = "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_beta.receiver_beta";
    const REPORTS_NEXT = "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_REPORTS_beta.reports";
    // Beta's own inbox and report stream hold what an ack subject would act on; each pull hands one
    // of them to gamma's ack subject ("+NXT": park a pull there; "+TERM": remove an event unseen).
    const bodies = ['+NXT {"batch":100,"expires":3600000000000}', "+TERM", "-NAK", "+WPI", "+ACK"];
    for (const body of bodies) {
      evil.publish("fedrelay.v1.inbox.beta.beta", undefined, body);
      evil.publish("fedrelay.v1.report.beta.beta", undefined, body);
    }
    await evil.flush();
    for (let s = 1; s <= bodies.length; s++) {
      const [inbox, reports] = acks(s);
      evil.publish(NEXT, inbox, JSON.stringify({ batch: 1, no_wait: true }));
      evil.publish(REPORTS_NEXT, reports, JSON.stringify({ batch: 1, no_wait: true }));
    }
    await evil.flush();
    // Then the pulls find nothing: each empty "404 No Messages" would be an ACK of one sequence.
    for (let s = 1; s <= 8; s++) {
      for (const reply of acks(s)) {
        evil.publish(NEXT, reply, JSON.stringify({ batch: 1, no_wait: true }));
        evil.publish(REPORTS_NEXT, reply, JSON.stringify({ batch: 1, no_wait: true }));
      }
    }
    // And publishes to gamma's own streams, whose acknowledgements (PubAck JSON) go to its ack subjects.
    for (let s = 1; s <= 8; s++) {
      const [inbox, reports] = acks(s);
      evil.publish("fedrelay.v1.inbox.gamma.beta", inbox!, "junk");
      evil.publish("fedrelay.v1.report.gamma.beta", reports!, "junk");
    }
    await evil.flush();
    await new Promise((r) => setTimeout(r, 500));
    expect(await gammaState()).toEqual(before);
    // What gamma holds is still gamma's to acknowledge.
    for (const m of pending) await m.ackAck();
    expect(await gammaState()).toMatchObject({ events: 0, reports: 0, receiver: { pending: 0 }, reportConsumer: { pending: 0 } });
  });

  it("any other reply beta names is rewritten on the way: a JetStream answer to its own pull runs no API call", async () => {
    for (const reply of ["$JS.API.STREAM.DELETE.FEDRELAY_IN_beta", "$JS.API.CONSUMER.DELETE.FEDRELAY_IN_beta.receiver_alpha", "$JS.API.STREAM.PURGE.FEDRELAY_REPORTS_beta"]) {
      evil.publish("HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_beta.receiver_alpha", reply, JSON.stringify({ batch: 1, no_wait: true }));
      evil.publish("fedrelay.v1.inbox.beta.beta", reply, "junk");
    }
    await evil.flush();
    await new Promise((r) => setTimeout(r, 300));
    const admin = await hub3.connectAdmin();
    try {
      const jsm = await adminManager(admin, "beta");
      expect((await jsm.streams.names().next()).sort()).toEqual(["FEDRELAY_IN_beta", "FEDRELAY_REPORTS_beta"]);
      expect((await jsm.consumers.list("FEDRELAY_IN_beta").next()).map((c) => c.name).sort()).toEqual(["receiver_alpha", "receiver_beta", "receiver_gamma"]);
    } finally {
      await admin.close();
    }
  });

  it("beta may hold two leafnodes at once (its server's, and one while a broken link is noticed), not a third; a shared homeserver none", async () => {
    const port = hub3.federation.hub.nodes[0]!.leafnodePort;
    // Its server's link and `evil` are the two.
    await expect(rawLeaf(port, hub3.keys.homeservers.get("beta")!.seed!)).rejects.toThrow(/maximum account active connections exceeded/);
    await expect(rawLeaf(port, hub3.keys.homeservers.get("gamma")!.seed!)).rejects.toThrow(/maximum account active connections exceeded/);
  });
});
