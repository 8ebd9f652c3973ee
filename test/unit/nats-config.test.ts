import { createUser } from "@nats-io/nkeys";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import { federationSchema, parseFederation, type Federation } from "../../src/federation/federation.ts";
import { federationKeys } from "../../src/federation/keys.ts";
import { hubNodeConfig, hubPermissions, natsConfigFiles, relaySettings } from "../../src/federation/nats-config.ts";
import { hubSpecs } from "../../src/federation/provision.ts";
import { drift, inboxSpec, reportSpec } from "../../src/transport/streams.ts";

function federation(input: Record<string, unknown>): Federation {
  return federationSchema.parse(input);
}

interface HubConfig {
  jetstream: unknown;
  cluster?: unknown;
  leafnodes: unknown;
  accounts: Record<string, { users: { nkey: string; permissions?: unknown }[]; exports?: unknown[]; imports?: unknown[] }> & { HUB: { exports: unknown[] } };
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

  it("a single node fsyncs every write and has no cluster; streams live in HUB, each homeserver in an account of its own importing only its part", () => {
    const fed = federation({ hub: ONE_NODE, homeservers: { alpha: { topology: "shared" }, beta: { topology: "bridged" } } });
    const k = keys(fed);
    const config = hubNodeConfig(fed, "hub-1", k) as unknown as HubConfig;
    expect(config.jetstream).toEqual({ store_dir: "/var/lib/fedrelay-hub", domain: "hub", sync_interval: "always" });
    expect(config.cluster).toBeUndefined();
    expect(config.leafnodes).toEqual({ listen: "0.0.0.0:7422" });
    expect(Object.keys(config.accounts).sort()).toEqual(["HUB", "alpha", "beta"]);
    expect(config.accounts.HUB).toMatchObject({ jetstream: "enabled", users: [{ nkey: k.admin.publicKey }] });
    expect(config.accounts.HUB.exports).toEqual(expect.arrayContaining([
      { service: "fedrelay.v1.inbox.*.*", account_token_position: 5 },
      { service: "$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta", accounts: ["alpha"], response_type: "stream" },
      { service: "$JS.ACK.FEDRELAY_IN_beta.receiver_alpha.>", accounts: ["beta"] },
    ]));
    // A homeserver's account runs no JetStream of its own: a reply sent to a $JS.API subject there runs nothing.
    expect(config.accounts.alpha).not.toHaveProperty("jetstream");
    expect(config.accounts.alpha).toEqual({
      users: [{ nkey: k.homeservers.get("alpha")!.publicKey, permissions: hubPermissions("alpha", ["alpha", "beta"]) }],
      imports: expect.arrayContaining([
        { service: { account: "HUB", subject: "fedrelay.v1.inbox.*.alpha" } },
        { service: { account: "HUB", subject: "$JS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta" }, to: "HUBJS.API.CONSUMER.MSG.NEXT.FEDRELAY_IN_alpha.receiver_beta" },
      ]),
    });
    const imported = JSON.stringify(config.accounts.alpha);
    expect(imported).not.toContain("FEDRELAY_IN_beta");
    expect(config).not.toHaveProperty("no_auth_user");
  });

  it("three nodes form a cluster routed to each other, each with a store of its own, and streams get 3 replicas", () => {
    const fed = federation({ hub: { ...THREE_NODES, maxStoreBytes: 64 * 1024 ** 3 }, homeservers: { alpha: { topology: "shared" } } });
    const config = hubNodeConfig(fed, "hub-b", keys(fed)) as unknown as HubConfig;
    expect(config.cluster).toEqual({
      name: "fedrelay-hub", listen: "0.0.0.0:6222",
      routes: ["nats-route://hub-a.example.net:6222", "nats-route://hub-b.example.net:6222", "nats-route://hub-c.example.net:6222"],
    });
    expect(config.jetstream).toEqual({ store_dir: "/var/lib/fedrelay-hub/hub-b", domain: "hub", max_file_store: 64 * 1024 ** 3 });
    expect(config.accounts.HUB).toMatchObject({ jetstream: { max_file: 64 * 1024 ** 3, max_mem: 0 } });
    expect(relaySettings(fed, "alpha", "/seed")).toMatchObject({ inbox: { replicas: 3 } });
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
});
