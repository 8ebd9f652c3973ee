/** Homeservers for integration tests: real relays on a real nats-server and Postgres. */
import { randomBytes } from "node:crypto";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { pino } from "pino";
import { loadConfig, type RelayConfig } from "../../src/config.ts";
import { generateSigningJwk, importSigningKey, type PrivateJwk, type SigningKey } from "../../src/protocol/keys.ts";
import type { EventClaims } from "../../src/protocol/claims.ts";
import { signEvent } from "../../src/protocol/sign.ts";
import { createRelay, type Relay, type RelayRoles } from "../../src/relay.ts";
import { testSchema, type TestSchema } from "./db.ts";

export const SERVICE_TOKEN = "test-service-token-0123456789";
export const NOW = () => Date.now() / 1000;

export interface Identity {
  readonly name: string;
  readonly jwk: PrivateJwk;
  readonly key: SigningKey;
  readonly publicJwk: object;
}

export async function identity(name: string, keyId = "k1"): Promise<Identity> {
  const jwk = await generateSigningJwk(name, keyId, Math.floor(Date.now() / 1000) - 3600);
  const key = importSigningKey(jwk);
  return { name, jwk, key, publicJwk: key.publicJwk };
}

export interface HomeserverOptions {
  readonly natsUrl: string;
  readonly peers: readonly Identity[];
  readonly roles?: RelayRoles;
  readonly overrides?: Record<string, unknown>;
  /** The relay's clock (seconds since the epoch), injected. */
  readonly now?: () => number;
}

export interface TestHomeserver {
  readonly id: Identity;
  readonly relay: Relay;
  readonly config: RelayConfig;
  readonly db: TestSchema;
  close(): Promise<void>;
}

export function homeserverConfig(id: Identity, db: TestSchema, options: HomeserverOptions): RelayConfig {
  return loadConfig({
    overrides: {
      homeserver: id.name,
      nats: { servers: [options.natsUrl] },
      postgres: { url: db.url, schema: db.schema, poolSize: 4 },
      // Every test calls from 127.0.0.1, and some present wrong credentials on purpose: the
      // per-source throttle (tested on its own) would otherwise refuse the next test's backend.
      http: { port: 0, serviceToken: SERVICE_TOKEN, serviceAuthFailures: { rate: 1000, burst: 10_000 } },
      keys: { signingKey: id.jwk },
      peers: Object.fromEntries(options.peers.map((p) => [p.name, { keys: [p.publicJwk] }])),
      log: { level: "silent" },
      worker: { retryDelayMs: 100 },
      ...options.overrides,
    },
  });
}

export async function startHomeserver(id: Identity, options: HomeserverOptions): Promise<TestHomeserver> {
  const db = testSchema(id.name);
  const config = homeserverConfig(id, db, options);
  const relay = createRelay(config, options.roles ?? { api: true, worker: true }, { log: pino({ level: "silent" }), ...(options.now ? { now: options.now } : {}) });
  await relay.start();
  return {
    id, relay, config, db,
    async close() {
      await relay.close();
      await db.drop();
    },
  };
}

export function eventClaims(from: Identity, to: string, rcpt: EventClaims["rcpt"], extra: Partial<EventClaims> = {}): EventClaims {
  const iat = Math.floor(Date.now() / 1000);
  return {
    iss: from.name, aud: to, jti: randomBytes(12).toString("base64url"), iat, exp: iat + 3600,
    grp: `g@${from.name}`, rcpt, body: Buffer.from("hello").toString("base64url"), ...extra,
  };
}

export async function signed(from: Identity, to: string, rcpt: EventClaims["rcpt"], extra: Partial<EventClaims> = {}): Promise<{ claims: EventClaims; token: string }> {
  const claims = eventClaims(from, to, rcpt, extra);
  return { claims, token: await signEvent(claims, from.key) };
}

export interface NatsClient {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  close(): Promise<void>;
}

export async function natsClient(url: string): Promise<NatsClient> {
  const nc = await connect({ servers: url });
  return { nc, js: jetstream(nc), close: () => nc.close() };
}

/** Polls until `check` returns a value (not undefined/false) or the deadline passes. */
export async function eventually<T>(check: () => Promise<T | undefined | false>, ms = 15_000, what = "condition"): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function http(url: string, init: { method?: string; token?: string; body?: unknown; raw?: string } = {}): Promise<{ status: number; json: Record<string, unknown> }> {
  const headers: Record<string, string> = {};
  if (init.token) headers.authorization = `Bearer ${init.token}`;
  if (init.body !== undefined || init.raw !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(url, {
    method: init.method ?? "GET",
    headers,
    ...(init.raw !== undefined ? { body: init.raw } : init.body !== undefined ? { body: JSON.stringify(init.body) } : {}),
  });
  const text = await res.text();
  return { status: res.status, json: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

/** The backend issues `clientId` a capability for `group` (as on a join) and returns the secret. */
export async function grantCapability(hs: TestHomeserver, clientId: string, group: string): Promise<string> {
  const res = await http(`${hs.relay.url}/v1/clients/${encodeURIComponent(clientId)}/capabilities`, { method: "POST", token: SERVICE_TOKEN, body: { group } });
  if (res.status !== 201) throw new Error(`capability for ${clientId}: ${res.status} ${JSON.stringify(res.json)}`);
  return res.json.capability as string;
}

/** Registers a client on a homeserver and returns its bearer token. */
export async function addClient(hs: TestHomeserver, clientId: string): Promise<string> {
  const put = await http(`${hs.relay.url}/v1/clients/${encodeURIComponent(clientId)}`, { method: "PUT", token: SERVICE_TOKEN });
  if (put.status >= 300) throw new Error(`register ${clientId}: ${put.status} ${JSON.stringify(put.json)}`);
  const tok = await http(`${hs.relay.url}/v1/clients/${encodeURIComponent(clientId)}/tokens`, { method: "POST", token: SERVICE_TOKEN });
  return tok.json.token as string;
}
