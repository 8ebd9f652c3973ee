/**
 * Configuration: a JSON file, then the environment, then flags, validated once at
 * start. `loadConfig` is pure; src/main.ts reads the file and process.env.
 */
import { createHash } from "node:crypto";
import { z } from "zod";
import { RelayError } from "./errors.ts";
import { DEFAULT_EVENT_LIMITS, MAX_RECIPIENTS } from "./protocol/claims.ts";
import { MAX_LIMIT } from "./policy/rate-limit.ts";
import { isServerPattern } from "./policy/server-rules.ts";
import { isClientId, isHomeserverName } from "./protocol/names.ts";
import { DEFAULT_JWKS_SETTINGS } from "./keys/registry.ts";

const homeserver = z.string().refine(isHomeserverName, "must be a lowercase DNS name (DESIGN §3)");
const limitSchema = z.strictObject({ rate: z.number().min(0).max(MAX_LIMIT), burst: z.number().min(1).max(MAX_LIMIT) });
// A sender's bucket must hold one whole event: up to 1,000 recipients (DESIGN §5).
const senderLimitSchema = z.strictObject({ rate: z.number().min(0).max(MAX_LIMIT), burst: z.number().min(MAX_RECIPIENTS, `must be at least ${MAX_RECIPIENTS} (one event's recipients)`).max(MAX_LIMIT) });
const jwk = z.looseObject({ kty: z.string(), kid: z.string() });

export const configSchema = z.strictObject({
  /** This homeserver's name; `localhost` works for a single box. */
  homeserver: homeserver.default("localhost"),
  nats: z.strictObject({
      // The machine's own nats-server; the demo and tests start their own instead.
      servers: z.array(z.string().min(1)).min(1).default(["nats://127.0.0.1:4222"]),
      // One credential at most: user and pass, a token, an nkey seed (what `fedrelay nats-config`
      // writes for a hub), or a .creds file (a user JWT and its seed, for servers in operator mode).
      user: z.string().optional(),
      pass: z.string().optional(),
      token: z.string().optional(),
      nkeySeed: z.string().regex(/^SU[A-Z2-7]{56}$/, "must be a user nkey seed (SU…, 58 characters)").optional(),
      /** Read at start into nkeySeed. */
      nkeySeedFile: z.string().optional(),
      /** Read at start into creds. */
      credsFile: z.string().optional(),
      creds: z.string().optional(),
      /** TLS to the server: its CA, and a client certificate where the server asks for one. */
      tls: z.strictObject({ caFile: z.string().optional(), certFile: z.string().optional(), keyFile: z.string().optional() })
        .refine((t) => (t.certFile === undefined) === (t.keyFile === undefined), "certFile and keyFile go together")
        .optional(),
      /** Reply subjects' prefix. A hub lets each homeserver receive only on its own, `_INBOX_<token>` (docs/protocol.md §4). */
      inboxPrefix: z.string().regex(/^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$/, "must be NATS subject tokens without wildcards").optional(),
      /**
       * Where this homeserver's inbox and report streams live when they are not on the
       * server it connects to: the hub's JetStream domain across a leafnode (bridged), or
       * an explicit JetStream API prefix. The outbox always lives on the server connected to.
       */
      domain: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/).optional(),
      apiPrefix: z.string().regex(/^[A-Za-z0-9_$-]+(?:\.[A-Za-z0-9_$-]+)*$/).optional(),
      // A relay creates and repairs its own streams and consumers on its own server. A hub
      // provisions them (`fedrelay nats-provision`) and gives no tenant the right to: false there,
      // and the worker only checks them, saying on /readyz what is wrong.
      manageStreams: z.boolean().default(true),
      // How often a worker checks that its streams and consumers are as they should be
      // (also at once when a pull fails): a tampered or deleted one is put back within this.
      checkIntervalSeconds: z.number().int().min(1).max(3600).default(15),
    })
    .refine((n) => [n.user !== undefined || n.pass !== undefined, n.token, n.nkeySeed ?? n.nkeySeedFile, n.creds ?? n.credsFile].filter(Boolean).length <= 1,
      "at most one credential: user/pass, token, nkeySeed(File) or creds(File)")
    .refine((n) => n.domain === undefined || n.apiPrefix === undefined, "domain and apiPrefix exclude each other")
    .default({ servers: ["nats://127.0.0.1:4222"], manageStreams: true, checkIntervalSeconds: 15 }),
  postgres: z.strictObject({
      // Trust auth on loopback, as this machine and CI run Postgres.
      url: z.string().min(1).default("postgresql://postgres@127.0.0.1:5432/postgres"),
      /** Schema for this homeserver's tables; defaults to `fedrelay_<token>` so homeservers can share a database. */
      schema: z.string().regex(/^[a-z_][a-z0-9_]{0,62}$/).optional(),
      // Two per worker batch in flight plus HTTP long-polls; Postgres' default max is 100.
      poolSize: z.number().int().min(1).max(1000).default(10),
    })
    .default({ url: "postgresql://postgres@127.0.0.1:5432/postgres", poolSize: 10 }),
  http: z.strictObject({
      host: z.string().default("127.0.0.1"),
      // 0 picks a free port (tests, several workers on one box).
      port: z.number().int().min(0).max(65535).default(8080),
      /** Bearer secret of the homeserver backend (POST /v1/fanout, client registration). Unset: those routes answer 401. */
      serviceToken: z.string().min(16).optional(),
      // Client tokens are minted by the backend per session; a day keeps re-login rare and leaks
      // short-lived. Also the longest lifetime a presented token may claim.
      clientTokenTtlSeconds: z.number().int().min(60).max(30 * 24 * 3600).default(24 * 3600),
      // Long-polls hold a request open; 30 s stays under common proxy idle timeouts (60 s).
      maxWaitSeconds: z.number().int().min(0).max(300).default(30),
      /**
       * A listener of its own for /metrics and /readyz (and /healthz), e.g. on an
       * internal interface for Prometheus. Unset, they are served on the public
       * listener and need the service token there. A worker without the API
       * serves them here, or on host/port when this is unset.
       */
      operator: z.strictObject({ host: z.string().default("127.0.0.1"), port: z.number().int().min(0).max(65535) }).optional(),
      // A fan-out carries one body (64 KiB is 87 KB of base64url) and its recipients, ~100 bytes
      // each with typical ids: 4 MiB holds ~40,000 of them; a bigger group goes in several requests.
      fanoutBodyLimitBytes: z.number().int().min(128 * 1024).max(64 * 1024 * 1024).default(4 * 1024 * 1024),
      // A request's headers come in one packet; 10 s forgives a slow mobile link, and ends a
      // connection that opens and says nothing (2,000 of them were held for 100 s before).
      headersTimeoutMs: z.number().int().min(100).max(120_000).default(10_000),
      // The whole request, body included: a 4 MiB fan-out at 2 Mbit/s takes ~17 s.
      requestTimeoutMs: z.number().int().min(100).max(600_000).default(30_000),
      // Open connections per listener; more are closed as they arrive. Each costs a file
      // descriptor (this machine allows 20,000 a process) and a few KB; 10,000 leaves room
      // for Postgres and NATS below the descriptor limit.
      maxConnections: z.number().int().min(1).default(10_000),
      // One source address (an IPv6 /64) may hold this many of them: one address cannot
      // take the listener for everyone (measured before: one address held all 10,000).
      // A carrier-grade NAT puts many users behind one address: raise it where clients sit behind one.
      maxConnectionsPerSource: z.number().int().min(1).default(500),
      // An idle keep-alive connection is closed after this (Fastify's default, 72 s, let idle
      // connections pile up); a long-poll client reconnects at once and a scrape every 15 s is
      // a new connection either way.
      keepAliveTimeoutMs: z.number().int().min(100).max(120_000).default(5000),
      // A client is one device: a few long-polls at once (a retry overlapping its
      // predecessor, a second tab). More are refused 429 rather than held.
      maxWaitsPerClient: z.number().int().min(1).max(1000).default(4),
      // Long-polls one API process holds at once: each costs 35–47 KB of the process's memory
      // (npm run bench:waits, 2,000 and 5,000 waiting polls), so about 200 MB at the cap.
      maxWaits: z.number().int().min(1).default(5000),
      // Failed service-token attempts per source address (an IPv6 /64): 10 at once, then one
      // every 5 s; the backend holds the right token, so only a guesser or a misconfiguration fails.
      serviceAuthFailures: limitSchema.default({ rate: 0.2, burst: 10 }),
    })
    .refine((h) => h.headersTimeoutMs <= h.requestTimeoutMs, { message: "headersTimeoutMs must not exceed requestTimeoutMs", path: ["headersTimeoutMs"] })
    .default({
      host: "127.0.0.1", port: 8080, clientTokenTtlSeconds: 24 * 3600, maxWaitSeconds: 30,
      fanoutBodyLimitBytes: 4 * 1024 * 1024, headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, maxConnections: 10_000,
      maxConnectionsPerSource: 500, keepAliveTimeoutMs: 5000,
      maxWaitsPerClient: 4, maxWaits: 5000, serviceAuthFailures: { rate: 0.2, burst: 10 },
    }),
  keys: z.strictObject({
      /** Path of this homeserver's current private JWK (`fedrelay keygen`). */
      signingKeyFile: z.string().optional(),
      /** Or the JWK itself (e.g. from a secret store via the environment). */
      signingKey: jwk.optional(),
      /** Public JWKs of retired keys, still served so old events stay provable. */
      retired: z.array(jwk).default([]),
    })
    .default({ retired: [] }),
  /** Federated homeservers: inline public JWKs, or a JWKS URL fetched and cached. */
  peers: z
    .record(
      homeserver,
      z.strictObject({ keys: z.array(jwk).optional(), jwksUrl: z.url().optional() })
        .refine((p) => p.keys !== undefined || p.jwksUrl !== undefined, "needs keys or jwksUrl"),
    )
    .default({}),
  /** Server-level recipient policy (DESIGN §2); the admin API and CLI add rules at run time. */
  policy: z.strictObject({
    mode: z.enum(["open", "allowlist"]).default("open"),
    allow: z.array(z.string().refine(isServerPattern, "must be a homeserver name or *.suffix")).default([]),
    deny: z.array(z.string().refine(isServerPattern, "must be a homeserver name or *.suffix")).default([]),
    // Run-time changes reach every process within this bound; the requirement is one second.
    refreshMs: z.number().int().min(50).max(1000).default(500),
  }).default({ mode: "open", allow: [], deny: [], refreshMs: 500 }),
  /**
   * Delivery rate limits (token buckets, exact across workers). Normal chat is a
   * message a second or less per client even in busy groups, so the defaults sit
   * an order of magnitude above it, with bursts sized for a backlog replayed
   * after an outage; a flood is cut to the sustained rate.
   */
  rateLimits: z.strictObject({
    enabled: z.boolean().default(true),
    // All senders together, per client: 20/s sustained, 10 minutes of 1/s at once.
    client: limitSchema.default({ rate: 20, burst: 600 }),
    // One homeserver to one client: a quarter of the client's budget.
    senderClient: limitSchema.default({ rate: 5, burst: 300 }),
    // One homeserver to all our clients: 2,000 deliveries/s, twenty 1,000-member messages at once.
    sender: senderLimitSchema.default({ rate: 2000, burst: 20_000 }),
    servers: z.record(homeserver, senderLimitSchema).default({}),
    clients: z.record(z.string().refine(isClientId, "must be a client id"), limitSchema).default({}),
    // An event over its sender's limit is retried until this old, then refused: 5 minutes
    // rides out a burst without letting a flooding sender queue work for hours.
    maxDelaySeconds: z.number().int().min(1).max(24 * 3600).default(300),
  }).default({
    enabled: true, client: { rate: 20, burst: 600 }, senderClient: { rate: 5, burst: 300 }, sender: { rate: 2000, burst: 20_000 },
    servers: {}, clients: {}, maxDelaySeconds: 300,
  }),
  /** Tests only: freeze the relay's clock at this time (seconds since the epoch), in every process that reads this config. */
  clock: z.strictObject({ frozenAt: z.number().min(0).optional() }).default({}),
  /** Tests and chaos only: the commit of an event with one of these ids fails, as a bug would (the same way every time). */
  faults: z.strictObject({ commitFailsFor: z.array(z.string().min(1).max(64)).max(100).default([]) }).default({ commitFailsFor: [] }),
  /** Fetching peers' key sets (src/keys/registry.ts). */
  jwks: z.strictObject({
    // Refetching a peer's JWKS on an unknown kid lets it rotate keys without us restarting;
    // the cooldown stops forged kids from turning us into a request amplifier.
    refreshCooldownSeconds: z.number().int().min(1).default(DEFAULT_JWKS_SETTINGS.refreshCooldownSeconds),
    timeoutMs: z.number().int().min(100).max(60_000).default(DEFAULT_JWKS_SETTINGS.timeoutMs),
    // A set past these is refused whole (src/keys/key-set.ts says why these sizes).
    maxBytes: z.number().int().min(1024).max(16 * 1024 * 1024).default(DEFAULT_JWKS_SETTINGS.maxBytes),
    maxKeys: z.number().int().min(1).max(100_000).default(DEFAULT_JWKS_SETTINGS.maxKeys),
    // An event waits for its key at most this long (its peer's endpoint down), then `unknown_key`:
    // an hour rides out a restart or a bad deploy of the peer's relay.
    maxWaitSeconds: z.number().int().min(1).max(7 * 24 * 3600).default(DEFAULT_JWKS_SETTINGS.maxWaitSeconds),
    // Every JWKS peer's set is fetched this often too (within the cooldown): a retirement is
    // learned within 5 minutes, not at the peer's next new key.
    refreshIntervalSeconds: z.number().int().min(1).max(24 * 3600).default(DEFAULT_JWKS_SETTINGS.refreshIntervalSeconds),
    // A retired key verifies events received up to this long after its exp (or after we learned
    // of it, if later): 15 minutes covers events in flight at a rotation; src/keys/registry.ts.
    retiredGraceSeconds: z.number().int().min(0).max(7 * 24 * 3600).default(DEFAULT_JWKS_SETTINGS.retiredGraceSeconds),
    // A revoked peer key is refused by every process within this; the requirement is one second.
    revocationRefreshMs: z.number().int().min(50).max(1000).default(DEFAULT_JWKS_SETTINGS.revocationRefreshMs),
  }).default({ ...DEFAULT_JWKS_SETTINGS }),
  limits: z.strictObject({
      maxMessageBytes: z.number().int().min(1024).max(DEFAULT_EVENT_LIMITS.maxMessageBytes).default(DEFAULT_EVENT_LIMITS.maxMessageBytes),
      maxBodyBytes: z.number().int().min(1).max(DEFAULT_EVENT_LIMITS.maxBodyBytes).default(DEFAULT_EVENT_LIMITS.maxBodyBytes),
      maxFutureSkewSeconds: z.number().int().min(0).default(DEFAULT_EVENT_LIMITS.maxFutureSkewSeconds),
      maxLifetimeSeconds: z.number().int().min(1).max(DEFAULT_EVENT_LIMITS.maxLifetimeSeconds).default(DEFAULT_EVENT_LIMITS.maxLifetimeSeconds),
    })
    .default({ ...DEFAULT_EVENT_LIMITS }),
  inbox: z.strictObject({
      // 1 on a single server (with sync_interval: always); 3 on a 3-node cluster.
      replicas: z.number().int().min(1).max(5).default(1),
      // Per-sender backlog quota (DESIGN §4): about an hour of a busy peer at 25 events/s.
      // Past it the sender's publishes are refused, not other senders' stored events dropped.
      maxMessagesPerSender: z.number().int().min(1).default(100_000),
      // Covers a publisher's retries after a lost acknowledgement; Postgres dedupes beyond it.
      duplicateWindowSeconds: z.number().int().min(1).default(120),
      // All senders' events waiting together: the per-sender quota counts messages, and 100,000
      // 1-MiB events from each of a few senders would fill any disk. 8 GiB is hours of a busy
      // federation's backlog at 1 KiB events; past it, publishes are refused, nothing stored dropped.
      maxBytes: z.number().int().min(1024 * 1024).default(8 * 1024 ** 3),
    })
    .default({ replicas: 1, maxMessagesPerSender: 100_000, duplicateWindowSeconds: 120, maxBytes: 8 * 1024 ** 3 }),
  worker: z.strictObject({
      consumer: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/).default("receiver"),
      // Measured: 200-event batches commit in tens of ms, far under ackWaitSeconds.
      batchSize: z.number().int().min(1).max(10_000).default(200),
      // Large events (1,000 recipients are ~80 KB) make smaller batches: bounds a worker's memory.
      // Measured (npm run bench, 1,000 recipients): 2 MiB peaks at 190–213 MB resident; 1 MiB at
      // 172–215 MB for ~100–125k deliveries/s, 768 KiB at 158–172 MB for 92–104k (this machine);
      // 200 events of 1 or 10 recipients (~460 and ~600 KB) are not cut short.
      maxBatchBytes: z.number().int().min(1024).default(768 * 1024),
      // An empty fetch returns after this; it bounds how long shutdown waits for a pull.
      // nats.js refuses pull expiries under a second.
      fetchExpiresMs: z.number().int().min(1000).max(60_000).default(1000),
      // A batch's ack timer starts when it reaches us; 30 s is ~100× a slow commit.
      ackWaitSeconds: z.number().int().min(1).default(30),
      // Bounds redelivery storms and memory: a few batches per worker in flight.
      maxAckPending: z.number().int().min(1).default(5000),
      // Back-off before a batch that failed for a transient reason (Postgres down) is redelivered.
      retryDelayMs: z.number().int().min(0).default(2000),
      // Senders not configured are served while their events wait (src/transport/inbox-senders.ts);
      // each costs a pull a second per worker. Their events are refused (unknown sender), so a
      // hundred at a time drain any number of them without a flood of pulls.
      maxUnlistedSenders: z.number().int().min(0).max(10_000).default(100),
      // SIGTERM lets batches in hand commit; past this, exit anyway (their messages are
      // redelivered). Under systemd's default 90 s and Kubernetes' 30 s grace period.
      shutdownTimeoutSeconds: z.number().int().min(1).max(600).default(20),
    })
    .default({ consumer: "receiver", batchSize: 200, maxBatchBytes: 768 * 1024, fetchExpiresMs: 1000, ackWaitSeconds: 30, maxAckPending: 5000, retryDelayMs: 2000, maxUnlistedSenders: 100, shutdownTimeoutSeconds: 20 }),
  fanout: z.strictObject({
      // A day covers a destination's outage; the protocol allows up to 7.
      eventLifetimeSeconds: z.number().int().min(60).max(DEFAULT_EVENT_LIMITS.maxLifetimeSeconds).default(24 * 3600),
      // A publish acknowledgement normally takes a millisecond; this bounds a stalled server.
      publishTimeoutMs: z.number().int().min(100).default(5000),
      /**
       * Fan-outs go first to a durable outbox on the server this relay connects to, and a
       * forwarder (in every worker) delivers them: `POST /v1/fanout` succeeds while the way to
       * a destination is down (a bridged homeserver's leafnode link). Off: published directly.
       */
      outbox: z.boolean().default(false),
      // The forwarder signs again (same jti, fresh iat and exp) an event with less lifetime left
      // than this: an outage of the sender's link longer than a lifetime loses nothing.
      resignWithinSeconds: z.number().int().min(1).default(300),
    })
    .default({ eventLifetimeSeconds: 24 * 3600, publishTimeoutMs: 5000, outbox: false, resignWithinSeconds: 300 }),
  /**
   * Delivery reports (DESIGN §8) are queued by the commit and published by a loop of their own
   * in each worker; these bound what one peer's report stream can cost us.
   */
  reports: z.strictObject({
      // A report publish takes ~1 ms: 256 at once keep up with any inbox, and a peer that never
      // answers holds at most its share of them until fanout.publishTimeoutMs.
      maxInFlight: z.number().int().min(1).max(10_000).default(256),
      // One peer's share: a stalled peer holds 16 publishes (and their memory), never the rest.
      maxInFlightPerPeer: z.number().int().min(1).max(10_000).default(16),
      // Reports wait here while a peer's report stream is down or full (it takes 1,024 from us at
      // once): 100,000 is a day of a busy peer at one event a second. Past it, the oldest are dropped.
      maxQueuedPerPeer: z.number().int().min(1).default(100_000),
      // A report stream keeps its reports a week; an older report would be of no use.
      maxAgeSeconds: z.number().int().min(60).default(7 * 24 * 3600),
      // A failing peer is tried again after 1, 2, 4 … seconds, at most this long.
      maxBackoffSeconds: z.number().int().min(1).max(3600).default(300),
    })
    .default({ maxInFlight: 256, maxInFlightPerPeer: 16, maxQueuedPerPeer: 100_000, maxAgeSeconds: 7 * 24 * 3600, maxBackoffSeconds: 300 }),
  /** What was refused, kept for audits and abuse disputes (src/store/retention.ts). */
  retention: z.strictObject({
      // Records of events nobody here received, and events refused outright. A month covers an
      // abuse report's round trip between operators; each record is a few hundred bytes plus its
      // refusals. Never shorter in effect than an event's lifetime: a record is its event's dedupe.
      refusedSeconds: z.number().int().min(3600).default(30 * 24 * 3600),
      // Each worker deletes what has passed retention this often, 10,000 rows at a time (each
      // delete a short transaction), until none is left.
      pruneIntervalSeconds: z.number().int().min(1).max(3600).default(60),
    })
    .default({ refusedSeconds: 30 * 24 * 3600, pruneIntervalSeconds: 60 }),
  log: z.strictObject({ level: z.enum(["fatal", "error", "warn", "info", "debug", "trace", "silent"]).default("info") })
    .default({ level: "info" }),
});

export type RelayConfig = Readonly<z.infer<typeof configSchema>> & { readonly postgres: { readonly schema: string } };
export type ConfigInput = z.input<typeof configSchema>;

type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** `SERVICE_TOKEN` → `serviceToken`. */
function camel(upperSnake: string): string {
  return upperSnake.toLowerCase().replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Settings that are strings even when they look like JSON (a digits-only password is still a password). */
const STRING_KEYS = new Set([
  "homeserver", "schema", "user", "pass", "token", "serviceToken", "url", "host", "signingKeyFile", "consumer", "level", "jwksUrl",
  "nkeySeed", "nkeySeedFile", "credsFile", "creds", "caFile", "certFile", "keyFile", "inboxPrefix", "domain", "apiPrefix",
]);

function envValue(key: string, raw: string): Json {
  if (STRING_KEYS.has(key)) return raw;
  try {
    return JSON.parse(raw) as Json;
  } catch {
    return raw;
  }
}

function setPath(target: Record<string, unknown>, path: readonly string[], value: unknown): void {
  let node = target;
  for (const key of path.slice(0, -1)) {
    const next = node[key];
    node = node[key] = next !== null && typeof next === "object" && !Array.isArray(next) ? { ...(next as object) } : {};
  }
  node[path.at(-1)!] = value;
}

/**
 * Environment overrides: `FEDRELAY_<SECTION>__<KEY>=value` sets `section.key`
 * (values are JSON when they parse as JSON), plus the conventional `NATS_URL`
 * (comma-separated) and `DATABASE_URL`.
 */
export function configFromEnv(env: Readonly<Record<string, string | undefined>>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (env.NATS_URL) setPath(out, ["nats", "servers"], env.NATS_URL.split(",").map((s) => s.trim()));
  if (env.DATABASE_URL) setPath(out, ["postgres", "url"], env.DATABASE_URL);
  for (const [name, raw] of Object.entries(env)) {
    if (!name.startsWith("FEDRELAY_") || raw === undefined || name === "FEDRELAY_CONFIG" || name === "FEDRELAY_NATS_SERVER") continue;
    const path = name.slice("FEDRELAY_".length).split("__").map(camel);
    setPath(out, path, envValue(path.at(-1)!, raw));
  }
  return out;
}

function merge(base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [key, value] of Object.entries(over)) {
    const prev = out[key];
    out[key] =
      value !== null && typeof value === "object" && !Array.isArray(value) &&
      prev !== null && typeof prev === "object" && !Array.isArray(prev)
        ? merge(prev as Record<string, unknown>, value as Record<string, unknown>)
        : value;
  }
  return out;
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    for (const inner of Object.values(value)) deepFreeze(inner);
    Object.freeze(value);
  }
  return value;
}

export interface ConfigSources {
  /** Text of the config file, and its path for messages. */
  readonly file?: { readonly path: string; readonly text: string };
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Highest precedence: command-line flags, or a test's own settings. */
  readonly overrides?: ConfigInput | Record<string, unknown>;
}

/**
 * `fedrelay_<name>` with `.` → `_` and `-` → `__`: injective, since a `.` never
 * touches a `-` in a valid name (a run of one `_` is a dot, an even run is hyphens).
 * Names too long for a Postgres identifier (63) keep a prefix and a hash.
 */
export function defaultSchema(homeserver: string): string {
  const schema = `fedrelay_${homeserver.replaceAll("-", "__").replaceAll(".", "_")}`;
  if (schema.length <= 63) return schema;
  return `${schema.slice(0, 50)}_${createHash("sha256").update(homeserver).digest("hex").slice(0, 12)}`;
}

/** Validates once; an invalid setting fails with `config_invalid` naming the key. */
export function loadConfig(sources: ConfigSources = {}): RelayConfig {
  let fromFile: Record<string, unknown> = {};
  if (sources.file) {
    try {
      const parsed: unknown = JSON.parse(sources.file.text);
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) throw new Error("not a JSON object");
      fromFile = parsed as Record<string, unknown>;
    } catch (cause) {
      throw new RelayError("config_invalid", `config file ${sources.file.path}: ${(cause as Error).message}`, { cause });
    }
  }
  const input = merge(merge(fromFile, configFromEnv(sources.env ?? {})), (sources.overrides ?? {}) as Record<string, unknown>);
  const result = configSchema.safeParse(input);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const key = issue.path.join(".") || (issue.code === "unrecognized_keys" ? issue.keys.join(", ") : "(root)");
    throw new RelayError("config_invalid", `config key ${key}: ${issue.message}`);
  }
  const config = result.data;
  const schema = config.postgres.schema ?? defaultSchema(config.homeserver);
  return deepFreeze({ ...config, postgres: { ...config.postgres, schema } });
}
