/**
 * `fedrelay nats-config`: a federation file in, the hub's nats-server configs,
 * each bridged homeserver's own server config and each relay's `nats` settings
 * out. Pure: keys come in, files go out as text.
 *
 * Isolation is NATS's own, by account. The streams live in one account, HUB,
 * which no homeserver can log into. Each homeserver has an account of its own,
 * named by its subject token, without JetStream, that imports from HUB exactly
 * its part (docs/protocol.md §4, "NATS rights on a hub"): publishing events and
 * reports as itself, and, under the prefix `HUBJS.API`, reading its own two
 * streams and pulling and acknowledging its own two consumers. Its user's
 * permissions allow the same and nothing else, so anything beyond is a
 * permissions violation. A JetStream reply a homeserver sends somewhere else
 * (a reply subject of `$JS.API.STREAM.DELETE.…`) arrives in its own account,
 * where no JetStream runs: in one shared account JetStream would have run it.
 * Bridged homeservers' leafnodes authenticate as the same users, into the same
 * accounts.
 *
 * Adding a homeserver adds its account. On nats-server 2.10.27 a new account's
 * imports from a JetStream account take effect only at the next reload after the
 * one that added it (measured: no responders after one reload, served after a
 * second; nats-io/nats-server#8560 reports the cluster case): apply a change with
 * two reloads.
 */
import { subjectToken } from "../protocol/names.ts";
import { inboxStreamName, inboxSubject, reportStreamName, reportSubject } from "../protocol/subjects.ts";
import { inboxConsumerName, REPORT_CONSUMER } from "../transport/streams.ts";
import type { Federation } from "./federation.ts";

/** The base of the inbox consumers' names on a hub, one per sender (the relay's worker.consumer must say the same). */
export const HUB_INBOX_CONSUMER = "receiver";
/** The account that holds every stream of a hub. */
export const HUB_ACCOUNT = "HUB";
/** Where a homeserver's account reaches HUB's JetStream API: the relay's nats.apiPrefix. */
export const HUB_API_PREFIX = "HUBJS.API";
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

/** A homeserver's account on the hub: its subject token (the inbox and report exports check that token). */
export function accountOf(homeserver: string): string {
  return subjectToken(homeserver);
}

/**
 * A homeserver's own streams and consumers on the hub: its inbox's consumers,
 * one per member sending to it (itself included), and its report consumer.
 * Each by name: a grant never holds a wildcard in a stream or consumer position.
 */
function ownConsumers(homeserver: string, members: readonly string[]): [stream: string, consumer: string][] {
  return [
    ...members.map((m): [string, string] => [inboxStreamName(homeserver), inboxConsumerName(HUB_INBOX_CONSUMER, subjectToken(m))]),
    [reportStreamName(homeserver), REPORT_CONSUMER],
  ];
}

/** The JetStream API calls a homeserver makes on its own streams, as HUB knows them ($JS.API.…). */
function ownApiSubjects(homeserver: string, members: readonly string[]): string[] {
  const streams = [inboxStreamName(homeserver), reportStreamName(homeserver)];
  return [
    // Stream info also answers the backlog by sender (fedrelay_peer_backlog_events).
    ...streams.map((stream) => `$JS.API.STREAM.INFO.${stream}`),
    ...ownConsumers(homeserver, members).flatMap(([stream, consumer]) => [
      `$JS.API.CONSUMER.INFO.${stream}.${consumer}`, `$JS.API.CONSUMER.MSG.NEXT.${stream}.${consumer}`,
    ]),
  ];
}

/** What a homeserver's user may do in its account: its own part and nothing else. */
export function hubPermissions(homeserver: string, members: readonly string[]): { publish: string[]; subscribe: string[] } {
  return {
    publish: [
      // Events and reports as itself, to anyone: the last token is the sender (DESIGN §4).
      inboxSubject("*", homeserver),
      reportSubject("*", homeserver),
      ...ownApiSubjects(homeserver, members).map((s) => s.replace("$JS.API.", `${HUB_API_PREFIX}.`)),
      // Acknowledgements (ack, nak, term) of what its own consumers delivered.
      ...ownConsumers(homeserver, members).map(([stream, consumer]) => `$JS.ACK.${stream}.${consumer}.>`),
    ],
    subscribe: [`${inboxPrefixOf(homeserver)}.>`],
  };
}

/**
 * HUB's exports: events and reports to anyone, as the importing account's own
 * sender token (account_token_position: the last token must be the importer's
 * account name); the JetStream calls on its own streams to each homeserver alone.
 */
function hubExports(homeservers: readonly string[]): object[] {
  return [
    { service: "fedrelay.v1.inbox.*.*", account_token_position: 5 },
    { service: "fedrelay.v1.report.*.*", account_token_position: 5 },
    ...homeservers.flatMap((h) => [
      ...ownApiSubjects(h, homeservers).map((subject) => ({ service: subject, accounts: [accountOf(h)], ...(subject.includes(".MSG.NEXT.") ? { response_type: "stream" } : {}) })),
      ...ownConsumers(h, homeservers).map(([stream, consumer]) => ({ service: `$JS.ACK.${stream}.${consumer}.>`, accounts: [accountOf(h)] })),
    ]),
  ];
}

/** A homeserver's account: its user, and its imports from HUB (the JetStream API under HUB_API_PREFIX). */
function homeserverAccount(homeserver: string, members: readonly string[], key: Nkey): object {
  const imported = (subject: string, to?: string) => ({ service: { account: HUB_ACCOUNT, subject }, ...(to === undefined ? {} : { to }) });
  return {
    users: [{ nkey: key.publicKey, permissions: hubPermissions(homeserver, members) }],
    imports: [
      imported(inboxSubject("*", homeserver)),
      imported(reportSubject("*", homeserver)),
      ...ownApiSubjects(homeserver, members).map((s) => imported(s, s.replace("$JS.API.", `${HUB_API_PREFIX}.`))),
      ...ownConsumers(homeserver, members).map(([stream, consumer]) => imported(`$JS.ACK.${stream}.${consumer}.>`)),
    ],
  };
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
  const names = Object.keys(fed.homeservers).sort();
  const accounts: Record<string, object> = {
    [HUB_ACCOUNT]: {
      jetstream: fed.hub.maxStoreBytes === undefined ? "enabled" : { max_file: fed.hub.maxStoreBytes, max_mem: 0 },
      users: [{ nkey: keys.admin.publicKey }],
      exports: hubExports(names),
    },
  };
  for (const name of names) {
    const key = keys.homeservers.get(name);
    if (!key) throw new TypeError(`no key for ${name}`);
    accounts[accountOf(name)] = homeserverAccount(name, names, key);
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
      ...(fed.hub.maxStoreBytes === undefined ? {} : { max_file_store: fed.hub.maxStoreBytes }),
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
    accounts,
  };
}

/** A bridged homeserver's own nats-server: its JetStream domain, and its leafnode to every hub node. */
export function leafConfig(fed: Federation, homeserver: string, key: Nkey): Record<string, unknown> {
  const leaf = fed.homeservers[homeserver]?.leaf ?? { listen: "127.0.0.1", port: 4222, storeDir: "/var/lib/fedrelay-nats" };
  return {
    server_name: `${subjectToken(homeserver)}-leaf`,
    listen: `${leaf.listen}:${leaf.port}`,
    max_payload: HUB_MAX_PAYLOAD,
    // Its relay is its only client, with the homeserver's own key: nobody else may read its
    // outbox or publish through its link as this homeserver.
    authorization: { users: [{ nkey: key.publicKey }] },
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
  const servers = hs.topology === "shared"
    ? fed.hub.nodes.map((n) => `nats://${n.host}:${n.clientPort}`)
    : [`nats://${hs.leaf?.listen === "0.0.0.0" ? "127.0.0.1" : (hs.leaf?.listen ?? "127.0.0.1")}:${hs.leaf?.port ?? 4222}`];
  return {
    homeserver,
    nats: { servers, nkeySeedFile: seedFile, inboxPrefix: inboxPrefixOf(homeserver), apiPrefix: HUB_API_PREFIX, manageStreams: false },
    // What the hub provisioned: the relay checks its streams against these.
    inbox: { replicas: replicasOf(fed), maxMessagesPerSender: s.maxMessagesPerSender, duplicateWindowSeconds: s.duplicateWindowSeconds, maxBytes: s.maxInboxBytes },
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
        `Hub node ${node.name}. Apply a change with nats-server --signal reload, twice (no restart; docs/operations.md, "Reload twice"), then fedrelay nats-provision.`,
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
