/**
 * A NATS hub on this machine, set up the way an operator sets up a real one: a
 * federation file, `nats-config`'s output written to a folder, the hub's
 * nats-server started on that config and provisioned with the admin key, and
 * for each bridged homeserver its own nats-server with a leafnode to the hub.
 * For the demo, tests and the chaos suite; loopback ports, temporary folders.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { connect, nkeyAuthenticator, type NatsConnection } from "@nats-io/transport-node";
import { freePort, startLocalNats, type LocalNats } from "../local-nats.ts";
import { federationSchema, type Federation } from "./federation.ts";
import { federationKeys } from "./keys.ts";
import { natsConfigFiles, type FederationKeys, type GeneratedFile } from "./nats-config.ts";
import { provisionHub } from "./provision.ts";

export type Topology = "shared" | "bridged";

export interface LocalHubOptions {
  readonly homeservers: Readonly<Record<string, Topology>>;
  /**
   * Where a bridged homeserver's server should reach the hub's leafnode port
   * (a proxy a test can cut); default: the port itself. When given, the hub
   * advertises its leafnodes at a port nothing listens on: a hub tells its
   * leaves its own leafnode address, and a leaf whose link dropped would try
   * that too, straight past the proxy.
   */
  readonly leafVia?: (homeserver: string, hubLeafnodePort: number) => Promise<number>;
}

export interface LocalHub {
  readonly server: LocalNats;
  readonly url: string;
  /** Where nats-config's files are. */
  readonly dir: string;
  readonly federation: Federation;
  readonly keys: FederationKeys;
  /** A bridged homeserver's own server. */
  leaf(name: string): LocalNats;
  /** What nats-config wrote for this homeserver's relay (fedrelay.json), as config overrides, the seed inline. */
  relaySettings(name: string): Promise<Record<string, unknown>>;
  /** A connection with a homeserver's own credential and reply prefix, as its relay has. */
  connectAs(name: string): Promise<NatsConnection>;
  /** A connection with the hub admin's key (nats-provision's). */
  connectAdmin(): Promise<NatsConnection>;
  /** Adds a homeserver: nats-config again, the hub reloads (no restart), nats-provision. */
  add(name: string, topology: Topology): Promise<void>;
  stop(): Promise<void>;
}

async function writeFiles(dir: string, files: readonly GeneratedFile[]): Promise<void> {
  for (const f of files) {
    const path = join(dir, f.path);
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, f.text, { mode: f.secret ? 0o600 : 0o644 });
  }
}

export async function startLocalHub(options: LocalHubOptions): Promise<LocalHub> {
  const dir = await mkdtemp(join(tmpdir(), "fedrelay-hub-"));
  const [clientPort, leafnodePort] = await Promise.all([freePort(), freePort()]);
  const input = {
    hub: { nodes: [{ name: "hub-1", host: "127.0.0.1", listen: "127.0.0.1", clientPort, leafnodePort, clusterPort: 6222 }], storeDir: join(dir, "hub-js") },
    // A link cut leaves the events a pull had in flight unacknowledged until ack_wait: 10 s keeps
    // the demo and the tests that cut links quick (a real hub keeps the relay's 30 s). Their events
    // are small: at most 64 KiB gives each sender a backlog of 30,840 in the 8 GiB inbox (a quarter
    // of it, src/federation/federation.ts), room for npm run chaos's 20,000 behind a cut link.
    streams: { ackWaitSeconds: 10, maxMessageBytes: 64 * 1024 },
    homeservers: {} as Record<string, unknown>,
  };
  const describe = async (name: string, topology: Topology): Promise<void> => {
    input.homeservers[name] = topology === "bridged"
      ? { topology, leaf: { listen: "127.0.0.1", port: await freePort(), storeDir: join(dir, `leaf-js-${name}`) } }
      : { topology };
  };
  for (const [name, topology] of Object.entries(options.homeservers)) await describe(name, topology);

  let federation: Federation = federationSchema.parse(input);
  let keys: FederationKeys = federationKeys(federation, { homeservers: new Map() });
  let files = new Map<string, string>();
  const generate = async (): Promise<void> => {
    const generated = natsConfigFiles(federation, keys, (name) => join(dir, `homeservers/${name}/nkey.seed`));
    await writeFiles(dir, generated);
    files = new Map(generated.map((f) => [f.path, f.text]));
  };
  await generate();
  const hubConf = (): string => {
    const text = files.get("hub/hub-1.conf")!;
    if (!options.leafVia) return text;
    const config = JSON.parse(text.replace(/^#.*$/gm, "")) as { leafnodes: Record<string, unknown> };
    config.leafnodes.advertise = "127.0.0.1:1";
    return JSON.stringify(config);
  };
  const server = await startLocalNats({ config: hubConf() });
  const leafs = new Map<string, LocalNats>();

  const stop = async (): Promise<void> => {
    for (const leaf of leafs.values()) await leaf.stop();
    await server.stop();
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const connectAdmin = (): Promise<NatsConnection> =>
      connect({ servers: server.url, authenticator: nkeyAuthenticator(new TextEncoder().encode(keys.admin.seed!)) });
    const provision = async (): Promise<void> => {
      const nc = await connectAdmin();
      try {
        const results = await provisionHub(nc, federation);
        const problems = results.flatMap((r) => r.problems);
        if (problems.length > 0) throw new Error(`provisioning the hub failed: ${problems.join("; ")}`);
      } finally {
        await nc.close();
      }
    };
    await provision();

    const startLeaf = async (name: string): Promise<void> => {
      let conf = files.get(`homeservers/${name}/nats-server.conf`)!;
      if (options.leafVia) {
        const port = await options.leafVia(name, leafnodePort);
        conf = conf.replace(`nats-leaf://127.0.0.1:${leafnodePort}`, `nats-leaf://127.0.0.1:${port}`);
      }
      leafs.set(name, await startLocalNats({ config: conf }));
    };
    for (const [name, topology] of Object.entries(options.homeservers)) if (topology === "bridged") await startLeaf(name);

    const relaySettings = async (name: string): Promise<Record<string, unknown>> => {
      const settings = JSON.parse(await readFile(join(dir, `homeservers/${name}/fedrelay.json`), "utf8")) as { nats: Record<string, unknown> } & Record<string, unknown>;
      const { nkeySeedFile, ...nats } = settings.nats;
      // `fedrelay serve` reads the seed file at start; a config built in process carries the seed itself.
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
      relaySettings,
      connectAdmin,
      async connectAs(name) {
        const settings = await relaySettings(name);
        return connect({
          servers: server.url,
          authenticator: nkeyAuthenticator(new TextEncoder().encode(keys.homeservers.get(name)!.seed!)),
          inboxPrefix: (settings.nats as { inboxPrefix: string }).inboxPrefix,
        });
      },
      async add(name, topology) {
        await describe(name, topology);
        federation = federationSchema.parse(input);
        const seeds = new Map([...keys.homeservers].flatMap(([n, k]) => (k.seed === undefined ? [] : [[n, k.seed] as [string, string]])));
        keys = federationKeys(federation, { admin: keys.admin.seed!, homeservers: seeds });
        await generate();
        // Twice: a new account's imports take effect only at the reload after the one that
        // added it (nats-server 2.10.27; src/federation/nats-config.ts).
        await server.reload(hubConf());
        await server.reload();
        await provision();
        if (topology === "bridged") await startLeaf(name);
      },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
