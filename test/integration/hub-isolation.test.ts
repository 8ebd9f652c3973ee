/**
 * A shared NATS hub where NATS itself isolates every homeserver (issue 14): the
 * hub runs the configuration `nats-config` generated, each relay connects with
 * its own credential, and everything one homeserver could do to another's
 * traffic is refused by the server as a permissions violation.
 */
import { connect, nkeyAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { createUser } from "@nats-io/nkeys";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SUBSCRIPTIONS_PER_CONNECTION } from "../../src/federation/nats-config.ts";
import { adminManager } from "../../src/federation/provision.ts";
import { createRelay } from "../../src/relay.ts";
import { testSchema } from "../helpers/db.ts";
import {
  addClient, eventually, grantCapability, homeserverConfig, http, identity, SERVICE_TOKEN, startHomeserver,
  type Identity, type TestHomeserver,
} from "../helpers/federation.ts";
import { rawLeaf, startHub, type Hub } from "../helpers/hub.ts";

let hub: Hub;
let alpha: Identity, beta: Identity, gamma: Identity;
let alphaHs: TestHomeserver, betaHs: TestHomeserver;
let intruder: NatsConnection;

beforeAll(async () => {
  hub = await startHub({ alpha: "shared", beta: "shared" });
  [alpha, beta, gamma] = await Promise.all([identity("alpha"), identity("beta"), identity("gamma")]);
  alphaHs = await startHomeserver(alpha, { natsUrl: hub.url, peers: [beta, gamma], overrides: await hub.relaySettings("alpha") });
  betaHs = await startHomeserver(beta, { natsUrl: hub.url, peers: [alpha, gamma], overrides: await hub.relaySettings("beta") });
  // Beta's own credential, used by a hostile operator of beta instead of its relay.
  intruder = await hub.connectAs("beta");
});

afterAll(async () => {
  await intruder?.close();
  await betaHs?.close();
  await alphaHs?.close();
  await hub?.stop();
});

/** Every permissions violation the server reports on `nc`, as it arrives. */
function violations(nc: NatsConnection): string[] {
  const seen: string[] = [];
  void (async () => {
    for await (const s of nc.status()) {
      if (s.type === "error") seen.push(String((s as { error?: Error }).error?.message ?? ""));
    }
  })();
  return seen;
}

let seen: string[];
beforeAll(() => {
  seen = violations(intruder);
});

/** `action` on the intruder's connection is refused by the server, naming `subject`, for publish or subscription. */
async function expectRefused(kind: "Publish" | "Subscription", subject: string, action: () => Promise<unknown> | unknown): Promise<void> {
  const before = seen.length;
  const outcome = await Promise.resolve().then(action).then(() => "done", (err: Error) => err.message);
  await intruder.flush().catch(() => undefined);
  const expected = `Permissions Violation for ${kind} to "${subject}"`;
  await eventually(async () => seen.slice(before).some((m) => m.includes(expected)) || outcome.includes(expected), 3000, expected);
}

const MEMBER_GROUP_ALPHA = "climbing@alpha";
const MEMBER_GROUP_BETA = "rowing@beta";

describe("on the shared hub, each homeserver may do its own part and nothing else", () => {
  it("fan-out with reports works both ways between homeservers connected with their own credentials", async () => {
    const bob = await addClient(betaHs, "bob");
    const ann = await addClient(alphaHs, "ann");
    const bobCap = await grantCapability(betaHs, "bob", MEMBER_GROUP_ALPHA);
    const annCap = await grantCapability(alphaHs, "ann", MEMBER_GROUP_BETA);
    const toBob = await http(`${alphaHs.relay.url}/v1/fanout?wait=10`, {
      method: "POST", token: SERVICE_TOKEN,
      body: { group: MEMBER_GROUP_ALPHA, body: Buffer.from("hi bob").toString("base64url"), recipients: [{ server: "beta", client: "bob", capability: bobCap }] },
    });
    expect(toBob.status).toBe(200);
    expect(toBob.json.reports).toEqual([expect.objectContaining({ server: "beta", accepted: ["bob"], refused: [] })]);
    const toAnn = await http(`${betaHs.relay.url}/v1/fanout?wait=10`, {
      method: "POST", token: SERVICE_TOKEN,
      body: { group: MEMBER_GROUP_BETA, body: Buffer.from("hi ann").toString("base64url"), recipients: [{ server: "alpha", client: "ann", capability: annCap }] },
    });
    expect(toAnn.json.reports).toEqual([expect.objectContaining({ server: "alpha", accepted: ["ann"], refused: [] })]);
    const bobGot = await http(`${betaHs.relay.url}/v1/messages`, { token: bob });
    const annGot = await http(`${alphaHs.relay.url}/v1/messages`, { token: ann });
    expect((bobGot.json.messages as { from: string }[]).map((m) => m.from)).toEqual(["alpha"]);
    expect((annGot.json.messages as { from: string }[]).map((m) => m.from)).toEqual(["beta"]);
  });

  it("beta cannot publish events or reports as alpha, to anyone", async () => {
    for (const subject of ["fedrelay.v1.inbox.beta.alpha", "fedrelay.v1.inbox.gamma.alpha", "fedrelay.v1.inbox.alpha.alpha", "fedrelay.v1.report.alpha.alpha", "fedrelay.v1.report.gamma.alpha"]) {
      await expectRefused("Publish", subject, () => intruder.publish(subject, "forged"));
    }
  });

  it("beta cannot list, read, or get messages from alpha's streams", async () => {
    for (const subject of [
      "$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "$JS.API.INFO",
      "$JS.API.STREAM.INFO.FEDRELAY_IN_alpha", "$JS.API.STREAM.MSG.GET.FEDRELAY_IN_alpha", "$JS.API.DIRECT.GET.FEDRELAY_IN_alpha",
      "$JS.API.STREAM.INFO.FEDRELAY_REPORTS_alpha", "HUBJS.API.STREAM.INFO.FEDRELAY_IN_alpha", "HUBJS.API.STREAM.NAMES",
    ]) {
      await expectRefused("Publish", subject, () => intruder.request(subject, JSON.stringify({ seq: 1 }), { timeout: 500 }));
    }
  });

  it("beta cannot create, change or delete a consumer on alpha's streams", async () => {
    for (const subject of [
      "$JS.API.CONSUMER.CREATE.FEDRELAY_IN_alpha.spy", "$JS.API.CONSUMER.DURABLE.CREATE.FEDRELAY_IN_alpha.spy",
      "$JS.API.CONSUMER.CREATE.FEDRELAY_IN_alpha.receiver", "$JS.API.CONSUMER.DELETE.FEDRELAY_IN_alpha.receiver",
      "$JS.API.CONSUMER.CREATE.FEDRELAY_REPORTS_alpha.spy",
    ]) {
      await expectRefused("Publish", subject, () => intruder.request(subject, JSON.stringify({ stream_name: "FEDRELAY_IN_alpha", config: { durable_name: "spy" } }), { timeout: 500 }));
    }
  });

  it("beta cannot pull from alpha's consumers, nor ack, nak or term what they deliver", async () => {
    for (const subject of ["$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver", "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver", "$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_REPORTS_alpha.reports"]) {
      await expectRefused("Publish", subject, () => intruder.request(subject, JSON.stringify({ batch: 1, expires: 500_000_000 }), { timeout: 500 }));
    }
    const ack = "$JS.ACK.FEDRELAY_IN_alpha.receiver.1.1.1.1796300000000000000.0";
    for (const body of ["+ACK", "-NAK", "+TERM"]) await expectRefused("Publish", ack, () => intruder.publish(ack, body));
  });

  it("beta cannot purge, change or delete alpha's streams (nor its own: the hub provisions them)", async () => {
    for (const stream of ["FEDRELAY_IN_alpha", "FEDRELAY_REPORTS_alpha", "FEDRELAY_IN_beta"]) {
      for (const op of ["PURGE", "UPDATE", "DELETE"]) {
        const subject = `$JS.API.STREAM.${op}.${stream}`;
        await expectRefused("Publish", subject, () => intruder.request(subject, JSON.stringify({ name: stream, subjects: [">"] }), { timeout: 500 }));
      }
    }
    await expectRefused("Publish", "$JS.API.STREAM.CREATE.STEAL", () => intruder.request("$JS.API.STREAM.CREATE.STEAL", JSON.stringify({ name: "STEAL", subjects: ["fedrelay.>"] }), { timeout: 500 }));
  });

  it("beta cannot subscribe to alpha's reply inbox, its reports, its inbox subjects, or everything", async () => {
    for (const subject of ["_INBOX_alpha.>", "_INBOX.>", "fedrelay.v1.report.alpha.*", "fedrelay.v1.inbox.alpha.*", "fedrelay.>", ">", "$JS.ACK.FEDRELAY_IN_alpha.>"]) {
      await expectRefused("Subscription", subject, () => intruder.subscribe(subject));
    }
  });

  it("a reply subject beta names is rewritten on the way: no JetStream answer runs as an API call, on alpha's streams or its own", async () => {
    const admin = await hub.connectAdmin();
    try {
      const state = async () => {
        const out: Record<string, unknown> = {};
        for (const h of ["alpha", "beta"]) {
          const jsm = await adminManager(admin, h);
          out[h] = { streams: (await jsm.streams.names().next()).sort(), consumers: (await jsm.consumers.list(`FEDRELAY_IN_${h}`).next()).map((c) => c.name).sort() };
        }
        return out;
      };
      const before = await state();
      // A pull from its own consumer (allowed) whose answers (messages, a headers-only "404 No Messages")
      // go to a JetStream API subject; and publishes whose acknowledgements ({"seq": N}) go there too.
      for (const target of [
        "$JS.API.CONSUMER.DELETE.FEDRELAY_IN_alpha.receiver_beta", "$JS.API.STREAM.PURGE.FEDRELAY_IN_alpha",
        "$JS.API.STREAM.DELETE.FEDRELAY_IN_alpha", "$JS.API.STREAM.DELETE.FEDRELAY_REPORTS_alpha", "fedrelay.v1.inbox.gamma.alpha",
        "$JS.API.STREAM.DELETE.FEDRELAY_IN_beta", "$JS.API.CONSUMER.DELETE.FEDRELAY_IN_beta.receiver_alpha",
      ]) {
        intruder.publish("HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_beta.receiver_beta", JSON.stringify({ batch: 100, no_wait: true }), { reply: target });
      }
      intruder.publish("fedrelay.v1.inbox.alpha.beta", "junk", { reply: "$JS.API.STREAM.MSG.DELETE.FEDRELAY_IN_alpha" });
      intruder.publish("fedrelay.v1.inbox.alpha.beta", "junk", { reply: "$JS.API.STREAM.PURGE.FEDRELAY_IN_alpha" });
      await intruder.flush();
      await new Promise((r) => setTimeout(r, 1000));
      expect(await state()).toEqual(before);
      expect(before).toMatchObject({ alpha: { streams: ["FEDRELAY_IN_alpha", "FEDRELAY_REPORTS_alpha"], consumers: ["receiver_alpha", "receiver_beta"] } });
    } finally {
      await admin.close();
    }
  });

  it("beta's connections, subscriptions and leafnodes are bounded: past them the hub refuses, and alpha is not affected", async () => {
    const seed = new TextEncoder().encode(hub.keys.homeservers.get("beta")!.seed!);
    const { maxConnections } = hub.federation.homeservers.beta!;
    const opened: NatsConnection[] = [];
    const refused: string[] = [];
    try {
      // Its relay and the intruder hold two already.
      for (let i = 0; i < maxConnections; i++) {
        await connect({ servers: hub.url, reconnect: false, authenticator: nkeyAuthenticator(seed), inboxPrefix: "_INBOX_beta" })
          .then((nc) => opened.push(nc), (err: Error) => refused.push(err.message));
      }
      expect({ opened: opened.length, refused: refused.length }).toEqual({ opened: maxConnections - 2, refused: 2 });
      const alphaNc = await hub.connectAs("alpha");
      await alphaNc.close();
    } finally {
      for (const nc of opened) await nc.close();
    }
    const nc = await connect({ servers: hub.url, reconnect: false, authenticator: nkeyAuthenticator(seed), inboxPrefix: "_INBOX_beta" });
    const errors = violations(nc);
    try {
      for (let i = 0; i < SUBSCRIPTIONS_PER_CONNECTION + 10; i++) nc.subscribe(`_INBOX_beta.many.${i}`);
      await nc.flush();
      await eventually(async () => errors.some((m) => /maximum subscriptions exceeded/i.test(m)), 3000, "the subscription limit");
    } finally {
      await nc.close();
    }
    // A shared homeserver runs no leafnode.
    await expect(rawLeaf(hub.federation.hub.nodes[0]!.leafnodePort, hub.keys.homeservers.get("beta")!.seed!)).rejects.toThrow(/maximum account active connections exceeded/);
  });

  it("nothing beta tried reached alpha, and both relays still run", async () => {
    const bob = await addClient(betaHs, "bob2");
    const cap = await grantCapability(betaHs, "bob2", MEMBER_GROUP_ALPHA);
    const res = await http(`${alphaHs.relay.url}/v1/fanout?wait=10`, {
      method: "POST", token: SERVICE_TOKEN,
      body: { group: MEMBER_GROUP_ALPHA, body: Buffer.from("still here").toString("base64url"), recipients: [{ server: "beta", client: "bob2", capability: cap }] },
    });
    expect(res.json.reports).toEqual([expect.objectContaining({ accepted: ["bob2"] })]);
    expect(((await http(`${betaHs.relay.url}/v1/messages`, { token: bob })).json.messages as unknown[]).length).toBe(1);
    // What alpha refused is beta's own junk, on beta's own subject: attributed to beta, never to another.
    const refused = await alphaHs.relay.db.kysely.selectFrom("refused_events").select(["subject", "reason"]).execute();
    expect(refused.filter((r) => r.subject !== "fedrelay.v1.inbox.alpha.beta")).toEqual([]);
  });

  it("junk reports signed by beta (a reason no protocol has, a NUL in it) are refused and dropped; alpha's reports keep flowing", async () => {
    const { jetstream } = await import("@nats-io/jetstream");
    const { signToken } = await import("../../src/protocol/sign.ts");
    const { REPORT_TYP } = await import("../../src/protocol/claims.ts");
    const js = jetstream(intruder);
    const now = Math.floor(Date.now() / 1000);
    for (let i = 0; i < 20; i++) {
      const junk = await signToken({ iss: "beta", aud: "alpha", jti: `junk-${i}`, iat: now, ref: `nothing-${i}`, accepted: [], refused: [{ cid: "x", reason: `bad\u0000${i}` }] }, REPORT_TYP, beta.key);
      await js.publish("fedrelay.v1.report.alpha.beta", junk);
    }
    await addClient(betaHs, "bob3");
    const cap = await grantCapability(betaHs, "bob3", MEMBER_GROUP_ALPHA);
    const res = await http(`${alphaHs.relay.url}/v1/fanout?wait=10`, {
      method: "POST", token: SERVICE_TOKEN,
      body: { group: MEMBER_GROUP_ALPHA, body: Buffer.from("after the junk").toString("base64url"), recipients: [{ server: "beta", client: "bob3", capability: cap }] },
    });
    expect(res.json.reports).toEqual([expect.objectContaining({ server: "beta", accepted: ["bob3"] })]);
    const stored = await alphaHs.relay.db.kysely.selectFrom("reports").select("ref").where("ref", "like", "nothing-%").execute();
    expect(stored).toEqual([]);
  });

  it("an unauthenticated client, or one with an unknown key, cannot even connect", async () => {
    await expect(connect({ servers: hub.url, reconnect: false })).rejects.toThrow(/Authorization Violation/i);
    await expect(connect({ servers: hub.url, reconnect: false, authenticator: nkeyAuthenticator(createUser().getSeed()) })).rejects.toThrow(/Authorization Violation/i);
  });

  it("a relay refused by the hub says so in one line, naming the server and the credential", async () => {
    const db = testSchema("hub_refused");
    const settings = await hub.relaySettings("alpha");
    const config = homeserverConfig(alpha, db, {
      natsUrl: hub.url, peers: [],
      // A seed the hub never heard of.
      overrides: { ...settings, nats: { ...(settings.nats as object), nkeySeed: new TextDecoder().decode(createUser().getSeed()) } },
    });
    const relay = createRelay(config, { api: true, worker: true }, { log: pino({ level: "silent" }) });
    try {
      const err = await relay.start().then(() => undefined, (e: Error) => e);
      expect(err?.message).toMatch(new RegExp(`^NATS ${hub.url.replaceAll(".", "\\.")} refused nats\\.nkeySeed: authorization failed$`));
    } finally {
      await relay.close().catch(() => undefined);
      await db.drop();
    }
  });

  it("a homeserver added to the federation is served after the hub reloads its config, without a restart", async () => {
    const pid = hub.server.pid;
    await hub.add("gamma", "shared");
    expect(hub.server.pid).toBe(pid);
    const gammaHs = await startHomeserver(gamma, { natsUrl: hub.url, peers: [alpha, beta], overrides: await hub.relaySettings("gamma") });
    try {
      const gail = await addClient(gammaHs, "gail");
      const cap = await grantCapability(gammaHs, "gail", MEMBER_GROUP_ALPHA);
      const res = await http(`${alphaHs.relay.url}/v1/fanout?wait=10`, {
        method: "POST", token: SERVICE_TOKEN,
        body: { group: MEMBER_GROUP_ALPHA, body: Buffer.from("welcome").toString("base64url"), recipients: [{ server: "gamma", client: "gail", capability: cap }] },
      });
      expect(res.json.reports).toEqual([expect.objectContaining({ server: "gamma", accepted: ["gail"] })]);
      expect(((await http(`${gammaHs.relay.url}/v1/messages`, { token: gail })).json.messages as unknown[]).length).toBe(1);
      // And the newcomer is as confined as the others.
      const newcomer = await hub.connectAs("gamma");
      try {
        await expect(newcomer.request("$JS.API.STREAM.PURGE.FEDRELAY_IN_alpha", "{}", { timeout: 500 })).rejects.toThrow();
      } finally {
        await newcomer.close();
      }
    } finally {
      await gammaHs.close();
    }
  });
});
