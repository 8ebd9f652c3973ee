import { createUser } from "@nats-io/nkeys";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import { federationSchema, parseFederation, SENDER_SHARE, senderQuotaOf, type Federation } from "../../src/federation/federation.ts";
import { federationKeys } from "../../src/federation/keys.ts";
import {
  adminApiPrefixOf, HUB_PULL_EXPIRES_MS, HUB_RESPONSE_THRESHOLD_MS, hubNodeConfig, hubPermissions, natsConfigFiles, relaySettings,
  streamsStoreBytes, SUBSCRIPTIONS_PER_CONNECTION,
} from "../../src/federation/nats-config.ts";
import { hubSpecs } from "../../src/federation/provision.ts";
import { drift, inboxSpec, reportSpec } from "../../src/transport/streams.ts";

function federation(input: Record<string, unknown>): Federation {
  return federationSchema.parse(input);
}

interface HubConfig {
  jetstream: unknown;
  cluster?: unknown;
  leafnodes: unknown;
  accounts: Record<string, { users?: { nkey: string; permissions?: unknown }[]; jetstream?: unknown; limits?: unknown; exports?: unknown[]; imports?: unknown[] }>;
}

const ONE_NODE = { nodes: [{ name: "hub-1", host: "hub.example.net" }] };
const THREE_NODES = { nodes: ["a", "b", "c"].map((n) => ({ name: `hub-${n}`, host: `hub-${n}.example.net` })) };

describe("hubPermissions: a homeserver's part of the hub, and nothing else", () => {
  it("publishes only as itself, reads and pulls only its own streams and consumers (under HUBJS.API), receives only on its own prefix", () => {
    expect(hubPermissions("beta.example.org", ["alpha.example.org", "beta.example.org"])).toEqual({
      publish: [
        "fedrelay.v1.inbox.*.beta_example_org",
        "fedrelay.v1.report.*.beta_example_org",
        "HUBJS.API.STREAM.INFO.FEDRELAY_IN_beta_example_org",
        "HUBJS.API.STREAM.INFO.FEDRELAY_REPORTS_beta_example_org",
        // One inbox consumer per member sending to it, itself included (issue 15: senders served in turn).
        "HUBJS.API.CONSUMER.INFO.FEDRELAY_IN_beta_example_org.receiver_alpha_example_org",
        "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_beta_example_org.receiver_alpha_example_org",
        "HUBJS.API.CONSUMER.INFO.FEDRELAY_IN_beta_example_org.receiver_beta_example_org",
        "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_beta_example_org.receiver_beta_example_org",
        "HUBJS.API.CONSUMER.INFO.FEDRELAY_REPORTS_beta_example_org.reports",
        "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_REPORTS_beta_example_org.reports",
        "$JS.ACK.FEDRELAY_IN_beta_example_org.receiver_alpha_example_org.>",
        "$JS.ACK.FEDRELAY_IN_beta_example_org.receiver_beta_example_org.>",
        "$JS.ACK.FEDRELAY_REPORTS_beta_example_org.reports.>",
      ],
      subscribe: ["_INBOX_beta_example_org.>"],
    });
  });

  it("never grants a wildcard in a stream or consumer position, nor any admin call", () => {
    for (const subject of hubPermissions("a-b.example", ["a-b.example", "c.example"]).publish) {
      if (subject.startsWith("fedrelay.")) continue;
      expect(subject).not.toMatch(/\.(CREATE|UPDATE|DELETE|PURGE|NAMES|LIST|MSG\.GET|DIRECT)\b/);
      expect(subject.replace(/\.>$/, "")).not.toMatch(/[*>]/);
    }
  });
});

describe("hubNodeConfig", () => {
  const keys = (fed: Federation) => federationKeys(fed, { homeservers: new Map() });
  const GIB = 1024 ** 3;

  it("a single node fsyncs every write and has no cluster; each homeserver's streams live in an account of their own, HUB_T, exporting to T only its part", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" }, beta: { topology: "bridged" } } });
    const config = hubNodeConfig(fed, "hub-1", keys(fed)) as unknown as HubConfig;
    expect(config.jetstream).toEqual({ store_dir: "/var/lib/fedrelay-hub", domain: "hub", sync_interval: "always" });
    expect(config.cluster).toBeUndefined();
    expect(config.leafnodes).toEqual({ listen: "0.0.0.0:7422" });
    expect(Object.keys(config.accounts).sort()).toEqual(["ADMIN", "HUB_alpha", "HUB_beta", "alpha", "beta"]);
    const hubAlpha = config.accounts.HUB_alpha!;
    // Nobody logs in; what it holds is bounded: a full inbox and a full report stream, nothing in memory.
    expect(hubAlpha).not.toHaveProperty("users");
    expect(hubAlpha.jetstream).toEqual({ max_file: 8 * GIB + 1 * GIB, max_mem: 0 });
    expect(hubAlpha.exports).toEqual(expect.arrayContaining([
      // Events and reports to alpha from anyone, each importer as itself.
      { service: "fedrelay.v1.inbox.alpha.*", account_token_position: 5 },
      { service: "fedrelay.v1.report.alpha.*", account_token_position: 5 },
      // Alpha's own pulls, their response mappings gone after 5 s.
      { service: "$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta", accounts: ["alpha"], response_type: "stream", response_threshold: "5s" },
      { service: "$JS.ACK.FEDRELAY_IN_alpha.receiver_beta.>", accounts: ["alpha"] },
      // The whole API to the hub operator alone.
      { service: "$JS.API.>", accounts: ["ADMIN"] },
    ]));
    expect(JSON.stringify(hubAlpha)).not.toMatch(/FEDRELAY_(IN|REPORTS)_beta/);
    for (const e of hubAlpha.exports as { accounts?: string[] }[]) expect([undefined, "alpha", "ADMIN"]).toContain(e.accounts?.join());
  });

  it("each homeserver's account runs no JetStream, imports every member's inbox and report subjects as itself and its own API under HUBJS.API, and is limited", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" }, beta: { topology: "bridged", maxConnections: 4 } } });
    const k = keys(fed);
    const config = hubNodeConfig(fed, "hub-1", k) as unknown as HubConfig;
    const alpha = config.accounts.alpha!;
    // A reply sent to a $JS.API subject there runs nothing.
    expect(alpha).not.toHaveProperty("jetstream");
    expect(alpha.users).toEqual([{ nkey: k.homeservers.get("alpha")!.publicKey, permissions: hubPermissions("alpha", ["alpha", "beta"]) }]);
    // One connection per relay process (16 by default), a relay's handful of subscriptions each, no leafnode.
    expect(alpha.limits).toEqual({ max_connections: 16, max_subscriptions: SUBSCRIPTIONS_PER_CONNECTION, max_leafnodes: 0 });
    // A bridged homeserver's server's link, and one more while a broken one is noticed.
    expect(config.accounts.beta!.limits).toEqual({ max_connections: 4, max_subscriptions: SUBSCRIPTIONS_PER_CONNECTION, max_leafnodes: 2 });
    expect(alpha.imports).toEqual(expect.arrayContaining([
      { service: { account: "HUB_alpha", subject: "fedrelay.v1.inbox.alpha.alpha" } },
      { service: { account: "HUB_beta", subject: "fedrelay.v1.inbox.beta.alpha" } },
      { service: { account: "HUB_beta", subject: "fedrelay.v1.report.beta.alpha" } },
      { service: { account: "HUB_alpha", subject: "$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta" }, to: "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta" },
    ]));
    // From another's streams account: its inbox and report subjects, as alpha, and nothing else.
    for (const imported of alpha.imports as { service: { account: string; subject: string } }[]) {
      if (imported.service.account === "HUB_alpha") continue;
      expect(imported.service.subject).toMatch(/^fedrelay\.v1\.(inbox|report)\.beta\.alpha$/);
    }
    expect(config).not.toHaveProperty("no_auth_user");
  });

  it("the hub operator's key reaches each homeserver's JetStream API under a prefix of its own, and nothing else", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" }, "beta.example": { topology: "shared" } } });
    const k = keys(fed);
    expect((hubNodeConfig(fed, "hub-1", k) as unknown as HubConfig).accounts.ADMIN).toEqual({
      users: [{ nkey: k.admin.publicKey }],
      imports: [
        { service: { account: "HUB_alpha", subject: "$JS.API.>" }, to: `${adminApiPrefixOf("alpha")}.>` },
        { service: { account: "HUB_beta_example", subject: "$JS.API.>" }, to: "ADMIN.beta_example.API.>" },
      ],
    });
  });

  it("nothing a homeserver may call on the hub names a wildcard in a stream or consumer position, nor an admin call", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { "a-b.example": { topology: "shared" }, "c.example": { topology: "bridged" } } });
    const config = hubNodeConfig(fed, "hub-1", keys(fed)) as unknown as HubConfig;
    const homeserverAccounts = ["a-b_example", "c_example"];
    const grants = [
      ...Object.values(config.accounts).flatMap((a) => (a.exports ?? []) as { service: string; accounts?: string[] }[])
        .filter((e) => e.accounts?.some((name) => homeserverAccounts.includes(name))).map((e) => e.service),
      ...homeserverAccounts.flatMap((name) => (config.accounts[name]!.imports as { service: { subject: string }; to?: string }[]).flatMap((i) => [i.service.subject, i.to ?? i.service.subject])),
    ];
    expect(grants.length).toBeGreaterThan(10);
    for (const subject of grants) {
      if (subject.startsWith("fedrelay.")) continue;
      expect(subject).not.toMatch(/\.(CREATE|UPDATE|DELETE|PURGE|NAMES|LIST|MSG\.GET|DIRECT)\b/);
      expect(subject.replace(/\.>$/, "")).not.toMatch(/[*>]/);
    }
  });

  it("three nodes form a cluster routed to each other, each with a store of its own; streams get 3 replicas, each counted in HUB_T's bound", () => {
    const fed = federation({ hub: { ...THREE_NODES, maxStoreBytes: 64 * GIB }, streams: { maxInboxBytes: 2 * GIB }, homeservers: { alpha: { topology: "shared" } } });
    const config = hubNodeConfig(fed, "hub-b", keys(fed)) as unknown as HubConfig;
    expect(config.cluster).toEqual({
      name: "fedrelay-hub", listen: "0.0.0.0:6222",
      routes: ["nats-route://hub-a.example.net:6222", "nats-route://hub-b.example.net:6222", "nats-route://hub-c.example.net:6222"],
    });
    expect(config.jetstream).toEqual({ store_dir: "/var/lib/fedrelay-hub/hub-b", domain: "hub", max_file_store: 64 * GIB });
    expect(config.accounts.HUB_alpha!.jetstream).toEqual({ max_file: 3 * (2 * GIB + 1 * GIB), max_mem: 0 });
    // JetStream counts an account's streams at their max_bytes times their replicas.
    const { specs } = hubSpecs(fed)[0]!;
    expect(streamsStoreBytes(fed, "alpha")).toBe(specs.reduce((n, s) => n + s.stream.max_bytes! * s.stream.num_replicas!, 0));
    expect(relaySettings(fed, "alpha", "/seed")).toMatchObject({ inbox: { replicas: 3 } });
  });

  it("a relay on the hub pulls with an expiry under the pull's response threshold", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" } } });
    const worker = relaySettings(fed, "alpha", "/seed").worker as { fetchExpiresMs: number };
    expect(worker.fetchExpiresMs).toBe(HUB_PULL_EXPIRES_MS);
    expect(worker.fetchExpiresMs).toBeLessThan(HUB_RESPONSE_THRESHOLD_MS);
    expect(loadConfig({ overrides: relaySettings(fed, "alpha", "/seed") }).worker.fetchExpiresMs).toBe(HUB_PULL_EXPIRES_MS);
  });
});

describe("natsConfigFiles", () => {
  it("writes each node's config, the seeds it made (secret), each relay's settings and each bridged homeserver's own server config", () => {
    const kept = createUser();
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" }, beta: { topology: "bridged" }, gamma: { topology: "bridged", nkey: kept.getPublicKey() } } });
    const files = natsConfigFiles(fed, federationKeys(fed, { homeservers: new Map() }), (n) => `/etc/fedrelay/${n}.seed`);
    expect(files.map((f) => [f.path, f.secret])).toEqual([
      ["hub/hub-1.conf", false],
      ["hub/admin.seed", true],
      ["homeservers/alpha/nkey.seed", true],
      ["homeservers/alpha/fedrelay.json", false],
      ["homeservers/beta/nkey.seed", true],
      ["homeservers/beta/fedrelay.json", false],
      ["homeservers/beta/nats-server.conf", true],
      ["homeservers/gamma/fedrelay.json", false],
      ["homeservers/gamma/nats-server.conf", false],
    ]);
    const gammaLeaf = files.find((f) => f.path === "homeservers/gamma/nats-server.conf")!.text;
    // A variable reference, which NATS config writes unquoted.
    expect(gammaLeaf).toContain('"nkey": $FEDRELAY_NKEY_SEED');
    expect(gammaLeaf).not.toMatch(/SU[A-Z2-7]{56}/);
    // NATS config is JSON after its comment lines (but for that reference).
    expect(JSON.parse(gammaLeaf.replace(/^#.*$/gm, "").replace("$FEDRELAY_NKEY_SEED", '"seed"'))).toMatchObject({
      jetstream: { domain: "gamma" }, leafnodes: { remotes: [{ urls: ["nats-leaf://hub.example.net:7422"] }] },
      // Its one client is its relay, with the homeserver's own key.
      authorization: { users: [{ nkey: kept.getPublicKey() }] },
    });
  });

  it("keeps the seeds of an earlier run", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" } } });
    const first = federationKeys(fed, { homeservers: new Map() });
    const second = federationKeys(fed, { admin: first.admin.seed!, homeservers: new Map([["alpha", first.homeservers.get("alpha")!.seed!]]) });
    expect(second).toEqual(first);
  });
});

describe("what the hub provisions is what each relay checks against", () => {
  it("a relay configured with nats-config's settings expects exactly the specs nats-provision creates, for both topologies", () => {
    const fed = federation({
      hub: THREE_NODES, streams: { maxMessagesPerSender: 500, ackWaitSeconds: 45 },
      homeservers: { "alpha.example": { topology: "shared" }, "beta.example": { topology: "bridged" } },
    });
    for (const { homeserver, specs } of hubSpecs(fed)) {
      const config = loadConfig({ overrides: relaySettings(fed, homeserver, "/seed") as Record<string, unknown> });
      // The relay serves its configured peers and itself: here, every member.
      const relayInbox = inboxSpec(homeserver, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, ["alpha_example", "beta_example"]);
      expect({ ...relayInbox, exclusive: undefined }).toEqual({ ...specs[0], exclusive: undefined });
      expect(relayInbox.consumers.map((c) => [c.durable_name, c.filter_subject])).toEqual([
        ["receiver_alpha_example", `fedrelay.v1.inbox.${homeserver.replace(".", "_")}.alpha_example`],
        ["receiver_beta_example", `fedrelay.v1.inbox.${homeserver.replace(".", "_")}.beta_example`],
      ]);
      expect(reportSpec(homeserver, config.inbox.replicas)).toEqual(specs[1]);
      expect(drift(specs[0]!.stream, relayInbox.stream)).toEqual([]);
    }
  });
});

describe("drift", () => {
  it("names each differing field with what it is and what it should be, treating absent as empty or off", () => {
    const desired = { max_age: 0, subjects: ["a.*"], republish: undefined, sealed: false, sources: undefined };
    expect(drift({ max_age: 0, subjects: ["a.*"], sealed: undefined }, desired)).toEqual([]);
    expect(drift({ max_age: 60, subjects: ["a.*", "b.*"], republish: { src: ">", dest: "x" }, sealed: true, sources: [{ name: "X" }] }, desired)).toEqual([
      "max_age: 60 (expected 0)",
      'subjects: ["a.*","b.*"] (expected ["a.*"])',
      'republish: {"src":">","dest":"x"} (expected absent)',
      "sealed: true (expected false)",
      'sources: [{"name":"X"}] (expected absent)',
    ]);
  });
});

describe("parseFederation", () => {
  it("names the key of what is wrong", () => {
    const bad = (value: unknown) => () => parseFederation(JSON.stringify(value), "fed.json");
    expect(bad({ hub: { nodes: [] }, homeservers: { a: { topology: "shared" } } })).toThrow(/fed\.json: hub\.nodes:/);
    expect(bad({ hub: ONE_NODE, homeservers: { "Not A Name": { topology: "shared" } } })).toThrow(/homeservers/);
    expect(bad({ hub: ONE_NODE, homeservers: { a: { topology: "mesh" } } })).toThrow(/homeservers\.a\.topology/);
    expect(bad({ hub: ONE_NODE, homeservers: { a: { topology: "shared", nkey: "SUXYZ" } } })).toThrow(/nkey/);
    expect(bad({ hub: ONE_NODE, homeservers: {} })).toThrow(/at least one homeserver/);
    expect(() => parseFederation("{", "fed.json")).toThrow(/federation file fed\.json/);
  });

  it("refuses a per-sender quota with which one sender could fill an inbox alone, in one line naming the fields and the numbers", () => {
    const parse = (streams: object) => parseFederation(JSON.stringify({ hub: ONE_NODE, streams, homeservers: { a: { topology: "shared" } } }), "fed.json");
    // The review's case: 100,000 events of 1 MiB from one sender against an 8 GiB inbox.
    expect(() => parse({ maxMessagesPerSender: 100_000 })).toThrow(expect.objectContaining({
      code: "config_invalid",
      message: "federation file fed.json: streams.maxMessagesPerSender: maxMessagesPerSender 100000 × (maxMessageBytes 1048576 + 4096) = 105267200000 bytes " +
        "is over maxInboxBytes 8589934592 / 4 = 2147483648: one sender could fill the inbox alone; at most 2040",
    }));
    expect(parse({ maxMessagesPerSender: 2040 }).streams.maxMessagesPerSender).toBe(2040);
    expect(() => parse({ maxMessagesPerSender: 2041 })).toThrow(/at most 2040$/);
    // Small events: the count quota is the bound that matters.
    expect(parse({ maxMessagesPerSender: 100_000, maxMessageBytes: 16 * 1024 }).streams.maxMessagesPerSender).toBe(100_000);
    expect(() => parse({ maxInboxBytes: 2 * 1024 * 1024 })).toThrow(/^federation file fed\.json: streams\.maxInboxBytes: maxInboxBytes 2097152 \/ 4 = 524288 holds not one event/);
    expect(SENDER_SHARE).toBe(4);
  });

  it("derives the per-sender quota when the file gives none: a quarter of the inbox in the largest events, at most 100,000", () => {
    const quota = (streams: object) => federation({ hub: ONE_NODE, streams, homeservers: { a: { topology: "shared" } } }).streams.maxMessagesPerSender;
    expect(federation({ hub: ONE_NODE, homeservers: { a: { topology: "shared" } } }).streams.maxMessagesPerSender).toBe(2040);
    expect(quota({ maxMessageBytes: 64 * 1024, maxInboxBytes: 16 * 1024 ** 3 })).toBe(Math.floor(4 * 1024 ** 3 / (68 * 1024)));
    expect(quota({ maxMessageBytes: 1024, maxInboxBytes: 64 * 1024 ** 3 })).toBe(100_000);
    // Whatever the quota, a quarter of the inbox holds one sender's.
    for (const streams of [{}, { maxMessageBytes: 4096 }, { maxInboxBytes: 3 * 1024 ** 3 }]) {
      const s = federation({ hub: ONE_NODE, streams, homeservers: { a: { topology: "shared" } } }).streams;
      expect(s.maxMessagesPerSender * (s.maxMessageBytes + 4096)).toBeLessThanOrEqual(s.maxInboxBytes / SENDER_SHARE);
      expect(senderQuotaOf(s)).toBe(s.maxMessagesPerSender);
    }
  });
});
