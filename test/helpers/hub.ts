/**
 * A NATS hub as an operator runs one: a federation file, `nats-config`'s
 * output written to a folder, the hub's nats-server started on that config and
 * provisioned with the admin key, and for each bridged homeserver its own
 * nats-server, whose leafnode reaches the hub through a TCP proxy a test can cut.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect, nkeyAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { federationSchema, type Federation } from "../../src/federation/federation.ts";
import { federationKeys } from "../../src/federation/keys.ts";
import { natsConfigFiles, type FederationKeys } from "../../src/federation/nats-config.ts";
import { provisionHub } from "../../src/federation/provision.ts";
import { freePort, startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { startTcpProxy, type TcpProxy } from "./tcp-proxy.ts";

export type Topology = "shared" | "bridged";

export interface Hub {
  readonly server: LocalNats;
  readonly url: string;
  /** Where nats-config's files are. */
  readonly dir: string;
  readonly federation: Federation;
  readonly keys: FederationKeys;
  /** A bridged homeserver's own server. */
  leaf(name: string): LocalNats;
  /** The proxy between a bridged homeserver's server and the hub's leafnode port: cut() is a link down. */
  link(name: string): TcpProxy;
  /** What nats-config wrote for this homeserver's relay (fedrelay.json), as config overrides. */
  relaySettings(name: string): Promise<Record<string, unknown>>;
  /** A connection with a homeserver's own credential and reply prefix, as its relay has. */
  connectAs(name: string): Promise<NatsConnection>;
  /** Adds a homeserver: nats-config again, the hub reloads (no restart), nats-provision. */
  add(name: string, topology: Topology): Promise<void>;
  stop(): Promise<void>;
}

async function writeFiles(dir: string, files: readonly { path: string; text: string; secret: boolean }[]): Promise<void> {
  for (const f of files) {
    const path = join(dir, f.path);
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, f.text, { mode: f.secret ? 0o600 : 0o644 });
  }
}

export async function startHub(homeservers: Readonly<Record<string, Topology>>): Promise<Hub> {
  const dir = await mkdtemp(join(tmpdir(), "fedrelay-hub-"));
  const [clientPort, leafnodePort] = await Promise.all([freePort(), freePort()]);
  const leafPorts = new Map<string, number>();
  const input = {
    hub: { nodes: [{ name: "hub-1", host: "127.0.0.1", listen: "127.0.0.1", clientPort, leafnodePort, clusterPort: 6222 }], storeDir: join(dir, "hub-js") },
    homeservers: {} as Record<string, unknown>,
  };
  const describe = async (name: string, topology: Topology): Promise<void> => {
    if (topology === "bridged") {
      const port = await freePort();
      leafPorts.set(name, port);
      input.homeservers[name] = { topology, leaf: { listen: "127.0.0.1", port, storeDir: join(dir, `leaf-js-${name}`) } };
    } else {
      input.homeservers[name] = { topology };
    }
  };
  for (const [name, topology] of Object.entries(homeservers)) await describe(name, topology);

  let federation: Federation = federationSchema.parse(input);
  let keys: FederationKeys = federationKeys(federation, { homeservers: new Map() });
  const generate = async (): Promise<Map<string, string>> => {
    const files = natsConfigFiles(federation, keys, (name) => join(dir, `homeservers/${name}/nkey.seed`));
    await writeFiles(dir, files);
    return new Map(files.map((f) => [f.path, f.text]));
  };
  let files = await generate();
  /**
   * A hub tells its leafnodes its own leafnode address, and a leaf whose link drops
   * tries that too: straight past the test's proxy. Advertised as a port nothing
   * listens on, the leaves keep to the proxy, so cutting it is a link down.
   */
  const hubConf = (): string => {
    const text = files.get("hub/hub-1.conf")!;
    const config = JSON.parse(text.replace(/^#.*$/gm, "")) as { leafnodes: Record<string, unknown> };
    config.leafnodes.advertise = "127.0.0.1:1";
    return JSON.stringify(config);
  };
  const server = await startLocalNats({ config: hubConf() });

  const admin = async (): Promise<NatsConnection> =>
    connect({ servers: server.url, authenticator: nkeyAuthenticator(new TextEncoder().encode(keys.admin.seed!)) });
  const provision = async (): Promise<void> => {
    const nc = await admin();
    try {
      const results = await provisionHub(await jetstreamManager(nc, { checkAPI: false }), federation);
      const problems = results.flatMap((r) => r.problems);
      if (problems.length > 0) throw new Error(`provisioning failed: ${problems.join("; ")}`);
    } finally {
      await nc.close();
    }
  };
  await provision();

  const leafs = new Map<string, LocalNats>();
  const links = new Map<string, TcpProxy>();
  const startLeaf = async (name: string): Promise<void> => {
    const link = await startTcpProxy({ host: "127.0.0.1", port: leafnodePort });
    links.set(name, link);
    // The leaf reaches the hub through the proxy, so a test can cut the link alone.
    const conf = files.get(`homeservers/${name}/nats-server.conf`)!.replace(`nats-leaf://127.0.0.1:${leafnodePort}`, `nats-leaf://127.0.0.1:${link.port}`);
    leafs.set(name, await startLocalNats({ config: conf }));
  };
  for (const [name, topology] of Object.entries(homeservers)) if (topology === "bridged") await startLeaf(name);

  const relaySettings = async (name: string): Promise<Record<string, unknown>> => {
    const settings = JSON.parse(await readFile(join(dir, `homeservers/${name}/fedrelay.json`), "utf8")) as { nats: Record<string, unknown> } & Record<string, unknown>;
    const { nkeySeedFile, ...nats } = settings.nats;
    // The CLI reads the seed file at start; a test's config carries the seed itself.
    const seed = nkeySeedFile === undefined ? {} : { nkeySeed: (await readFile(nkeySeedFile as string, "utf8")).trim() };
    const { homeserver: _homeserver, ...rest } = settings;
    return { ...rest, nats: { ...nats, ...seed } };
  };

  return {
    server,
    get url() { return server.url; },
    dir,
    get federation() { return federation; },
    get keys() { return keys; },
    leaf(name) {
      const leaf = leafs.get(name);
      if (!leaf) throw new Error(`${name} is not bridged`);
      return leaf;
    },
    link(name) {
      return links.get(name)!;
    },
    relaySettings,
    async connectAs(name) {
      const key = keys.homeservers.get(name)!;
      const settings = await relaySettings(name);
      return connect({
        servers: server.url,
        authenticator: nkeyAuthenticator(new TextEncoder().encode(key.seed!)),
        inboxPrefix: (settings.nats as { inboxPrefix: string }).inboxPrefix,
      });
    },
    async add(name, topology) {
      await describe(name, topology);
      federation = federationSchema.parse(input);
      const seeds = new Map([...keys.homeservers].flatMap(([n, k]) => (k.seed === undefined ? [] : [[n, k.seed] as [string, string]])));
      keys = federationKeys(federation, { admin: keys.admin.seed!, homeservers: seeds });
      files = await generate();
      await server.reload(hubConf());
      await provision();
      if (topology === "bridged") await startLeaf(name);
    },
    async stop() {
      for (const leaf of leafs.values()) await leaf.stop();
      for (const link of links.values()) await link.close();
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
