/**
 * `fedrelay nats-config`: a federation file in, the hub's nats-server configs,
 * each bridged homeserver's own server config and each relay's `nats` settings
 * out. Pure: keys come in, files go out as text.
 *
 * Isolation is NATS's own: one account, and per homeserver a user whose
 * permissions allow exactly its part (docs/protocol.md §4, "On a shared hub"):
 * publishing events and reports as itself, reading (not changing) its own two
 * streams, pulling and acknowledging its own two consumers, and receiving on a
 * reply prefix no one else may use. Streams are the hub's, provisioned by
 * `fedrelay nats-provision`. Why one account and not one per homeserver:
 * measured on nats-server 2.10.27, a homeserver's account added by a config
 * reload could not reach another account's stream through its service import
 * until a second reload (nats-io/nats-server#8560 reports the same in clusters,
 * where it stays broken), while users and permissions reload cleanly. Leafnode
 * connections authenticate as the same users, so a bridged homeserver has the
 * same rights across its link.
 */
import { subjectToken } from "../protocol/names.ts";
import { inboxStreamName, inboxSubject, reportStreamName, reportSubject } from "../protocol/subjects.ts";
import { REPORT_CONSUMER } from "../transport/streams.ts";
import type { Federation } from "./federation.ts";

/** The consumer every homeserver's workers share on a hub (the relay's worker.consumer must say the same). */
export const HUB_INBOX_CONSUMER = "receiver";
/** The one account of a hub. */
export const HUB_ACCOUNT = "FEDRELAY";
/**
 * Events up to 1 MiB plus NATS headers; the server's default (1 MiB) would
 * refuse the largest events the protocol allows.
 */
export const HUB_MAX_PAYLOAD = 2 * 1024 * 1024;

export interface Nkey {
  readonly publicKey: string;
  /** Present when nats-config made the pair (or found it in the output folder). */
  readonly seed?: string;
}

export interface FederationKeys {
  readonly admin: Nkey;
  readonly homeservers: ReadonlyMap<string, Nkey>;
}

export interface GeneratedFile {
  /** Relative to the output folder. */
  readonly path: string;
  readonly text: string;
  /** Holds a seed: written readable by its owner only. */
  readonly secret: boolean;
}

/** A homeserver's reply prefix on the hub: nobody else may subscribe to it. */
export function inboxPrefixOf(homeserver: string): string {
  return `_INBOX_${subjectToken(homeserver)}`;
}

/** What a homeserver's user may do on the hub: its own part and nothing else. */
export function hubPermissions(homeserver: string, hubDomain: string): { publish: string[]; subscribe: string[] } {
  const own: [stream: string, consumer: string][] = [
    [inboxStreamName(homeserver), HUB_INBOX_CONSUMER],
    [reportStreamName(homeserver), REPORT_CONSUMER],
  ];
  // Connected to the hub, JetStream calls are $JS.API.…; from a leafnode they name the hub's domain.
  const apis = ["$JS.API", `$JS.${hubDomain}.API`];
  const publish = [
    // Events and reports as itself, to anyone: the last token is the sender (DESIGN §4).
    inboxSubject("*", homeserver),
    reportSubject("*", homeserver),
  ];
  for (const api of apis) {
    for (const [stream, consumer] of own) {
      publish.push(`${api}.STREAM.INFO.${stream}`, `${api}.CONSUMER.INFO.${stream}.${consumer}`, `${api}.CONSUMER.MSG.NEXT.${stream}.${consumer}`);
    }
  }
  // Acknowledgements (ack, nak, term) of what its own consumers delivered.
  for (const [stream, consumer] of own) publish.push(`$JS.ACK.${stream}.${consumer}.>`);
  return { publish, subscribe: [`${inboxPrefixOf(homeserver)}.>`] };
}

export function replicasOf(fed: Federation): number {
  return fed.hub.replicas ?? (fed.hub.nodes.length >= 3 ? 3 : 1);
}

function syncAlwaysOf(fed: Federation): boolean {
  return fed.hub.syncAlways ?? fed.hub.nodes.length === 1;
}

/** The nats-server config of one hub node, as an object (NATS config is a superset of JSON). */
export function hubNodeConfig(fed: Federation, nodeName: string, keys: FederationKeys): Record<string, unknown> {
  const node = fed.hub.nodes.find((n) => n.name === nodeName);
  if (!node) throw new TypeError(`no hub node ${nodeName}`);
  const users: object[] = [{ nkey: keys.admin.publicKey }];
  for (const name of Object.keys(fed.homeservers).sort()) {
    const key = keys.homeservers.get(name);
    if (!key) throw new TypeError(`no key for ${name}`);
    users.push({ nkey: key.publicKey, permissions: hubPermissions(name, fed.hub.domain) });
  }
  const clustered = fed.hub.nodes.length > 1;
  return {
    server_name: node.name,
    listen: `${node.listen}:${node.clientPort}`,
    max_payload: HUB_MAX_PAYLOAD,
    jetstream: {
      store_dir: clustered ? `${fed.hub.storeDir}/${node.name}` : fed.hub.storeDir,
      domain: fed.hub.domain,
      ...(syncAlwaysOf(fed) ? { sync_interval: "always" } : {}),
    },
    ...(clustered ? {
      cluster: {
        name: fed.hub.clusterName,
        listen: `${node.listen}:${node.clusterPort}`,
        routes: fed.hub.nodes.map((n) => `nats-route://${n.host}:${n.clusterPort}`),
      },
    } : {}),
    // Bridged homeservers' servers connect here, as the same users as their relays would.
    leafnodes: { listen: `${node.listen}:${node.leafnodePort}` },
    accounts: { [HUB_ACCOUNT]: { jetstream: "enabled", users } },
  };
}

/** A bridged homeserver's own nats-server: its JetStream domain, and its leafnode to every hub node. */
export function leafConfig(fed: Federation, homeserver: string, key: Nkey): Record<string, unknown> {
  const leaf = fed.homeservers[homeserver]?.leaf ?? { listen: "127.0.0.1", port: 4222, storeDir: "/var/lib/fedrelay-nats" };
  return {
    server_name: `${subjectToken(homeserver)}-leaf`,
    listen: `${leaf.listen}:${leaf.port}`,
    max_payload: HUB_MAX_PAYLOAD,
    // Its outbox lives here: fsynced, since this server is alone.
    jetstream: { store_dir: leaf.storeDir, domain: subjectToken(homeserver), sync_interval: "always" },
    leafnodes: {
      remotes: [{
        urls: fed.hub.nodes.map((n) => `nats-leaf://${n.host}:${n.leafnodePort}`),
        // The seed itself (nats-server takes no file here); without one, from the environment.
        nkey: key.seed ?? SEED_FROM_ENVIRONMENT,
      }],
    },
  };
}

/** The settings a homeserver's relay needs on this federation: merge them into its config file. */
export function relaySettings(fed: Federation, homeserver: string, seedFile: string): Record<string, unknown> {
  const hs = fed.homeservers[homeserver];
  if (!hs) throw new TypeError(`no homeserver ${homeserver}`);
  const s = fed.streams;
  const nats = hs.topology === "shared"
    ? { servers: fed.hub.nodes.map((n) => `nats://${n.host}:${n.clientPort}`), nkeySeedFile: seedFile }
    : { servers: [`nats://${hs.leaf?.listen === "0.0.0.0" ? "127.0.0.1" : (hs.leaf?.listen ?? "127.0.0.1")}:${hs.leaf?.port ?? 4222}`], domain: fed.hub.domain };
  return {
    homeserver,
    nats: { ...nats, inboxPrefix: inboxPrefixOf(homeserver), manageStreams: false },
    // What the hub provisioned: the relay checks its streams against these.
    inbox: { replicas: replicasOf(fed), maxMessagesPerSender: s.maxMessagesPerSender, duplicateWindowSeconds: s.duplicateWindowSeconds },
    limits: { maxMessageBytes: s.maxMessageBytes },
    worker: { consumer: HUB_INBOX_CONSUMER, ackWaitSeconds: s.ackWaitSeconds, maxAckPending: s.maxAckPending },
    ...(hs.topology === "bridged" ? { fanout: { outbox: true } } : {}),
  };
}

/** Stands for a reference to an environment variable, which NATS config writes unquoted. */
const SEED_FROM_ENVIRONMENT = "\u0000FEDRELAY_NKEY_SEED";

/** NATS config text: a comment saying where it came from, then the object as JSON (which nats-server reads). */
export function renderNatsConf(config: Record<string, unknown>, comment: readonly string[]): string {
  const json = JSON.stringify(config, null, 2).replaceAll(JSON.stringify(SEED_FROM_ENVIRONMENT), "$FEDRELAY_NKEY_SEED");
  return `${comment.map((line) => `# ${line}`).join("\n")}\n${json}\n`;
}

/** Every file `nats-config` writes. `seedFileOf` says where a homeserver's relay will find its seed. */
export function natsConfigFiles(fed: Federation, keys: FederationKeys, seedFileOf: (homeserver: string) => string): GeneratedFile[] {
  const files: GeneratedFile[] = [];
  const generated = "Written by fedrelay nats-config from the federation file; edit that file and run it again.";
  for (const node of fed.hub.nodes) {
    files.push({
      path: `hub/${node.name}.conf`,
      text: renderNatsConf(hubNodeConfig(fed, node.name, keys), [
        generated,
        `Hub node ${node.name}. Apply a change with: nats-server --signal reload (no restart), then fedrelay nats-provision.`,
      ]),
      secret: false,
    });
  }
  if (keys.admin.seed !== undefined) files.push({ path: "hub/admin.seed", text: `${keys.admin.seed}\n`, secret: true });
  for (const [name, hs] of Object.entries(fed.homeservers).sort(([a], [b]) => a.localeCompare(b))) {
    const key = keys.homeservers.get(name)!;
    const dir = `homeservers/${name}`;
    if (key.seed !== undefined) files.push({ path: `${dir}/nkey.seed`, text: `${key.seed}\n`, secret: true });
    files.push({ path: `${dir}/fedrelay.json`, text: `${JSON.stringify(relaySettings(fed, name, seedFileOf(name)), null, 2)}\n`, secret: false });
    if (hs.topology === "bridged") {
      files.push({
        path: `${dir}/nats-server.conf`,
        text: renderNatsConf(leafConfig(fed, name, key), [generated, `${name}'s own nats-server: its outbox, and its leafnode to the hub.`]),
        // It holds the seed when nats-config made it.
        secret: key.seed !== undefined,
      });
    }
  }
  return files;
}
