/**
 * `fedrelay nats-config`: a federation file in, the hub's nats-server configs,
 * each bridged homeserver's own server config and each relay's `nats` settings
 * out. Pure: keys come in, files go out as text.
 *
 * Isolation is NATS's own, by account (docs/protocol.md §4, "NATS rights on a
 * hub"). Each homeserver T has two:
 *
 * - `HUB_T` holds its streams and consumers, with JetStream limited to what
 *   they may hold. Nobody logs into it. It exports its inbox and report
 *   subjects to everyone, each importer as itself (`account_token_position`),
 *   and the JetStream calls and acknowledgements of its own consumers to T
 *   alone, and its whole JetStream API to the hub operator's account, ADMIN.
 * - `T`, named by its subject token, without JetStream: its user, connection
 *   limits, and its imports: every member's inbox and report subjects (as
 *   itself), and its own streams' calls under the prefix `HUBJS.API`. Its
 *   user's permissions allow the same and nothing else.
 *
 * Why an account of streams per homeserver, and not one for all: a reply
 * subject that starts with `$JS.ACK.` crosses a service import unchanged
 * (nats-server's processServiceImport), and only client connections are
 * refused one, not leafnodes. A bridged homeserver pulling from its own
 * consumer with the reply `$JS.ACK.<another's stream>.…` had JetStream's
 * answer (an empty 404 is an ACK) land on that consumer when both lived in one
 * account: an outside review deleted another homeserver's events unseen. Now
 * such an answer lands in the puller's own HUB_T, where only its own consumers
 * are; a publish to another's inbox with such a reply gets a PubAck there,
 * JSON, which an ack subject ignores. Any other reply a homeserver names is
 * rewritten by the import (`_R_.…`), so a reply of `$JS.API.STREAM.DELETE.…`
 * runs nothing.
 *
 * Adding a homeserver adds its two accounts and imports from its HUB_T to every
 * other homeserver's and to ADMIN. On nats-server 2.10.27 those already work
 * after one reload, but the new account's own imports only after the next
 * (measured: "no responders" after one, served after two; nats-io/nats-server#8560
 * reports the cluster case): apply a change with two reloads (docs/operations.md,
 * "Reload twice"; local-hub.ts does it, and hub-isolation.test.ts checks it).
 */
import { subjectToken } from "../protocol/names.ts";
import { inboxStreamName, inboxSubject, reportStreamName, reportSubject } from "../protocol/subjects.ts";
import { inboxConsumerName, REPORT_CONSUMER, reportSpec } from "../transport/streams.ts";
import type { Federation } from "./federation.ts";

/** The base of the inbox consumers' names on a hub, one per sender (the relay's worker.consumer must say the same). */
export const HUB_INBOX_CONSUMER = "receiver";
/** The hub operator's account: no streams of its own, every HUB_T's JetStream API under adminApiPrefixOf(T). */
export const ADMIN_ACCOUNT = "ADMIN";
/** Where a homeserver's account reaches its HUB_T's JetStream API: the relay's nats.apiPrefix. */
export const HUB_API_PREFIX = "HUBJS.API";
/**
 * Events up to 1 MiB plus NATS headers; the server's default (1 MiB) would
 * refuse the largest events the protocol allows.
 */
export const HUB_MAX_PAYLOAD = 2 * 1024 * 1024;
/**
 * How long a pull's answers may come back through the MSG.NEXT import. Each
 * pull leaves a response mapping in HUB_T until then (default two minutes: an
 * outside review's million no-wait pulls took the hub from 17 to 792 MiB
 * resident; measured, 800,000 in 30 s: 636 MiB and every mapping kept without
 * it, 209 MiB and none left 5 s later with it). A relay's pull must expire
 * before it, or what the pull is handed later is dropped on the way (measured:
 * 7 s into a 10 s pull): relaySettings writes HUB_PULL_EXPIRES_MS.
 */
export const HUB_RESPONSE_THRESHOLD_MS = 5000;
/** A relay's pull on a hub (worker.fetchExpiresMs): the relay's default, well under HUB_RESPONSE_THRESHOLD_MS. */
export const HUB_PULL_EXPIRES_MS = 1000;
/**
 * Subscriptions per connection of a homeserver. A relay holds a handful (its
 * reply subscription, a pull or two per loop); a bridged homeserver's server
 * passes on its relay's across the leafnode (measured: 6 while its relay pulls
 * from its three consumers and its outbox). Without a bound, one connection of
 * an outside review's held a million (hub resident 808 MiB).
 */
export const SUBSCRIPTIONS_PER_CONNECTION = 1000;
/**
 * Leafnode connections of a bridged homeserver at once: its server's, and one
 * more while the hub has not yet noticed that a broken link is gone (a leaf
 * reconnects within seconds, the hub notices after its pings go unanswered).
 * A shared homeserver runs none.
 */
export const BRIDGED_LEAFNODES = 2;

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

/** The account that holds a homeserver's streams on the hub (upper case: no subject token is). */
export function streamsAccountOf(homeserver: string): string {
  return `HUB_${subjectToken(homeserver)}`;
}

/** Where the hub operator's account reaches a homeserver's JetStream API (nats-provision's apiPrefix). */
export function adminApiPrefixOf(homeserver: string): string {
  return `ADMIN.${subjectToken(homeserver)}.API`;
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

/** The JetStream API calls a homeserver makes on its own streams, as its HUB_T knows them ($JS.API.…). */
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
 * What a homeserver's streams may hold on the hub's disks, all replicas counted (as JetStream counts
 * an account's use): its inbox and its report stream full, and nothing in memory.
 */
export function streamsStoreBytes(fed: Federation, homeserver: string): number {
  const replicas = replicasOf(fed);
  return replicas * (fed.streams.maxInboxBytes + reportSpec(homeserver, replicas).stream.max_bytes!);
}

/**
 * HUB_T: a homeserver's streams. Its events and reports to anyone, as the
 * importing account's own sender token (account_token_position: the last token
 * must be the importer's account name); the JetStream calls on its streams and
 * the acknowledgements of its consumers to T alone; the whole API to ADMIN.
 */
function streamsAccount(fed: Federation, homeserver: string, members: readonly string[]): object {
  const token = subjectToken(homeserver);
  const own = [accountOf(homeserver)];
  return {
    jetstream: { max_file: streamsStoreBytes(fed, homeserver), max_mem: 0 },
    exports: [
      { service: `fedrelay.v1.inbox.${token}.*`, account_token_position: 5 },
      { service: `fedrelay.v1.report.${token}.*`, account_token_position: 5 },
      ...ownApiSubjects(homeserver, members).map((subject) => ({
        service: subject, accounts: own,
        ...(subject.includes(".MSG.NEXT.") ? { response_type: "stream", response_threshold: `${HUB_RESPONSE_THRESHOLD_MS / 1000}s` } : {}),
      })),
      ...ownConsumers(homeserver, members).map(([stream, consumer]) => ({ service: `$JS.ACK.${stream}.${consumer}.>`, accounts: own })),
      { service: "$JS.API.>", accounts: [ADMIN_ACCOUNT] },
    ],
  };
}

/** T: a homeserver's user, its limits, and its imports (its own JetStream API under HUB_API_PREFIX). */
function homeserverAccount(fed: Federation, homeserver: string, members: readonly string[], key: Nkey): object {
  const own = streamsAccountOf(homeserver);
  const imported = (account: string, subject: string, to?: string) => ({ service: { account, subject }, ...(to === undefined ? {} : { to }) });
  return {
    users: [{ nkey: key.publicKey, permissions: hubPermissions(homeserver, members) }],
    limits: {
      max_connections: fed.homeservers[homeserver]!.maxConnections,
      max_subscriptions: SUBSCRIPTIONS_PER_CONNECTION,
      max_leafnodes: fed.homeservers[homeserver]!.topology === "bridged" ? BRIDGED_LEAFNODES : 0,
    },
    imports: [
      ...members.flatMap((destination) => [
        imported(streamsAccountOf(destination), inboxSubject(destination, homeserver)),
        imported(streamsAccountOf(destination), reportSubject(destination, homeserver)),
      ]),
      ...ownApiSubjects(homeserver, members).map((s) => imported(own, s, s.replace("$JS.API.", `${HUB_API_PREFIX}.`))),
      ...ownConsumers(homeserver, members).map(([stream, consumer]) => imported(own, `$JS.ACK.${stream}.${consumer}.>`)),
    ],
  };
}

/** ADMIN: the hub operator's key, and each homeserver's JetStream API under adminApiPrefixOf. */
function adminAccount(members: readonly string[], keys: FederationKeys): object {
  return {
    users: [{ nkey: keys.admin.publicKey }],
    imports: members.map((h) => ({ service: { account: streamsAccountOf(h), subject: "$JS.API.>" }, to: `${adminApiPrefixOf(h)}.>` })),
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
  const accounts: Record<string, object> = { [ADMIN_ACCOUNT]: adminAccount(names, keys) };
  for (const name of names) {
    const key = keys.homeservers.get(name);
    if (!key) throw new TypeError(`no key for ${name}`);
    accounts[streamsAccountOf(name)] = streamsAccount(fed, name, names);
    accounts[accountOf(name)] = homeserverAccount(fed, name, names, key);
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
    // A pull expires before its answers may no longer come back through the import (HUB_RESPONSE_THRESHOLD_MS).
    worker: { consumer: HUB_INBOX_CONSUMER, ackWaitSeconds: s.ackWaitSeconds, maxAckPending: s.maxAckPending, fetchExpiresMs: HUB_PULL_EXPIRES_MS },
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
