/**
 * The hostile-peer scenarios of `npm run chaos` (issue 15): a peer in good
 * standing (real keys, real capabilities) behaves badly while an honest peer
 * sends at a steady rate, and the honest peer's publish-to-commit latency is
 * compared with its latency alone, measured just before in the same run.
 *
 *   f  the hostile peer's report subject is a tarpit: it listens and never
 *      acknowledges (each report publish waits out its timeout), at 4 events/s
 *   g  the hostile peer has 50,000 events queued when the honest peer starts
 *   h  an event whose commit fails every time (faults.commitFailsFor) in a busy
 *      stream: every other event commits once, the poison is recorded as refused
 *
 * Targets: under f and g the honest p99 is at most twice its p99 alone, and at
 * most 100 ms.
 */
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import pg from "pg";
import { loadConfig } from "../src/config.ts";
import { startLocalNats } from "../src/local-nats.ts";
import { capabilityHash } from "../src/policy/capabilities.ts";
import type { EventClaims } from "../src/protocol/claims.ts";
import { generateSigningJwk, importSigningKey, type PrivateJwk, type SigningKey } from "../src/protocol/keys.ts";
import { signEvent } from "../src/protocol/sign.ts";
import { inboxStreamName, inboxSubject, reportSubject } from "../src/protocol/subjects.ts";
import { messageId } from "../src/transport/publisher.ts";
import { ensureInbox, ensureReportStream, inboxConsumerName } from "../src/transport/streams.ts";
import { freshDestination, publishAtRate, startProcess, type BenchProcess } from "./fixtures.ts";

export const HOSTILE_SCENARIOS = ["f", "g", "h"] as const;

const DESTINATION = "hostile";
const CLIENTS = 100;
const HONEST_RATE = 150;
const HONEST_SECONDS = 10;
const TARPIT_RATE = 4;
const BACKLOG = 50_000;
const POISON = "poison-1";

export interface Latency { readonly events: number; readonly p50: number; readonly p99: number }

export interface HostileOutcome {
  readonly scenario: string;
  /** What the scenario shows, one line. */
  readonly figures: string;
  /** Honest events published, stored once, lost, stored twice. */
  readonly published: number;
  readonly lost: number;
  readonly duplicated: number;
  /** The latency targets (f, g) or the poison's record (h). */
  readonly met: boolean;
  readonly alone?: Latency;
  readonly withHostile?: Latency;
}

interface Peer { readonly name: string; readonly key: SigningKey; readonly jwk: PrivateJwk; readonly caps: readonly string[] }

async function peer(name: string): Promise<Peer> {
  const jwk = await generateSigningJwk(name, "hostile", Math.floor(Date.now() / 1000) - 60);
  return { name, jwk, key: importSigningKey(jwk), caps: Array.from({ length: CLIENTS }, () => randomBytes(32).toString("base64url")) };
}

async function sign(from: Peer, jtis: readonly string[]): Promise<Buffer[]> {
  const iat = Math.floor(Date.now() / 1000);
  const body = randomBytes(256).toString("base64url");
  return Promise.all(jtis.map(async (jti, i) => {
    const c = i % CLIENTS;
    const claims: EventClaims = {
      iss: from.name, aud: DESTINATION, jti, iat, exp: iat + 86400, grp: `g@${from.name}`, rcpt: [{ cid: `c${c}`, cap: from.caps[c]! }], body,
    };
    return Buffer.from(await signEvent(claims, from.key), "latin1");
  }));
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Publishes as fast as JetStream acknowledges, 500 at a time. */
async function publishAll(nc: NatsConnection, from: string, events: readonly Buffer[]): Promise<void> {
  const js = jetstream(nc);
  for (let i = 0; i < events.length; i += 500) {
    await Promise.all(events.slice(i, i + 500).map((e) => js.publish(inboxSubject(DESTINATION, from), e, { msgID: messageId(e), timeout: 10_000 })));
  }
}

function latencyOf(sentAt: ReadonlyMap<string, number>, committedAt: ReadonlyMap<string, number>): Latency {
  const latencies = [...sentAt].map(([jti, at]) => committedAt.get(jti)! - at).sort((a, b) => a - b);
  const pct = (p: number): number => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))]!;
  return { events: latencies.length, p50: pct(50), p99: pct(99) };
}

export async function hostileScenario(name: string, pgUrl: string, log: (line: string) => void): Promise<HostileOutcome> {
  const schema = `chaos_hostile_${name}`;
  const nats = await startLocalNats();
  const admin = new pg.Pool({ connectionString: pgUrl, max: 2 });
  admin.on("error", () => undefined);
  const workers: BenchProcess[] = [];
  const [alpha, mallory, self] = await Promise.all([peer("alpha"), peer("mallory"), peer(DESTINATION)]);
  const path = `/tmp/fedrelay-hostile-${process.pid}.json`;
  const nc = await connect({ servers: nats.url });
  try {
    const config = loadConfig({
      overrides: {
        homeserver: DESTINATION, postgres: { url: pgUrl, schema, poolSize: 4 },
        http: { port: 0 }, log: { level: "error" },
        // The destination signs reports: that is what the tarpit (f) stalls.
        keys: { signingKey: self.jwk },
        peers: { alpha: { keys: [alpha.key.publicJwk] }, mallory: { keys: [mallory.key.publicJwk] } },
        // No rate limits: the hostile peer's backlog (g) goes in as fast as the workers take it.
        rateLimits: { enabled: false },
        faults: { commitFailsFor: [POISON] },
        // The scenario sets the streams up (freshDestination) and takes a consumer away (g).
        nats: { servers: [nats.url], manageStreams: false },
      },
    });
    const jsm: JetStreamManager = await jetstreamManager(nc);
    await freshDestination(admin, jsm, config, alpha.caps);
    await admin.query(
      `INSERT INTO ${schema}.capabilities (id, hash, client_id, grp, owner) SELECT 'mcap' || c, h, c, 'g@mallory', 'mallory' FROM unnest($1::text[], $2::bytea[]) AS t(c, h)`,
      [mallory.caps.map((_, i) => `c${i}`), mallory.caps.map((c) => capabilityHash(c))],
    );
    await Promise.all(["alpha", DESTINATION].map((hs) => ensureReportStream(jsm, hs, 1)));
    writeFileSync(path, JSON.stringify(config));
    const startWorkers = async (): Promise<void> => {
      workers.push(...await Promise.all([0, 1].map(() => startProcess(["src/main.ts", "worker", "--config", path], { ready: / on http/ }))));
    };

    const committed = async (iss: string): Promise<Map<string, number>> => {
      const { rows } = await admin.query<{ jti: string; at: number; n: string }>(
        `SELECT jti, extract(epoch FROM received_at) * 1000 AS at FROM ${schema}.events WHERE iss = $1`, [iss]);
      return new Map(rows.map((r) => [r.jti, Number(r.at)]));
    };
    const waitStored = async (iss: string, jtis: readonly string[], timeoutMs = 120_000): Promise<Map<string, number>> => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const stored = await committed(iss);
        if (jtis.every((j) => stored.has(j)) || Date.now() > deadline) return stored;
        await sleep(200);
      }
    };
    const duplicates = async (): Promise<number> => {
      const { rows } = await admin.query<{ n: string }>(`SELECT (SELECT count(*) FROM ${schema}.deliveries) - (SELECT count(DISTINCT (client_id, iss, jti)) FROM ${schema}.deliveries) AS n`);
      return Number(rows[0]!.n);
    };

    /** The honest peer at its steady rate: its latency, and what of it was stored. */
    const honest = async (label: string): Promise<{ latency: Latency; lost: number }> => {
      const jtis = Array.from({ length: HONEST_RATE * HONEST_SECONDS }, (_, i) => `${label}-${i}`);
      const sentTimes = await publishAtRate(nc, inboxSubject(DESTINATION, "alpha"), await sign(alpha, jtis), HONEST_RATE);
      const sentAt = new Map(jtis.map((j, i) => [j, sentTimes[i]!]));
      const stored = await waitStored("alpha", jtis);
      const lost = jtis.filter((j) => !stored.has(j)).length;
      return { latency: latencyOf(new Map([...sentAt].filter(([j]) => stored.has(j))), stored), lost };
    };
    const show = (l: Latency): string => `p50 ${l.p50.toFixed(1)} ms, p99 ${l.p99.toFixed(1)} ms`;
    const judged = (alone: Latency, withHostile: Latency): boolean => withHostile.p99 <= 2 * alone.p99 && withHostile.p99 <= 100;

    await startWorkers();
    if (name === "h") {
      // The poison among 2,000 honest events published at once.
      const jtis = Array.from({ length: 2000 }, (_, i) => (i === 700 ? POISON : `busy-${i}`));
      await publishAll(nc, "alpha", await sign(alpha, jtis));
      const others = jtis.filter((j) => j !== POISON);
      const stored = await waitStored("alpha", others);
      const { rows } = await admin.query<{ reason: string; claimed_jti: string }>(`SELECT reason, claimed_jti FROM ${schema}.refused_events`);
      const poisoned = rows.filter((r) => r.claimed_jti === POISON);
      const met = !stored.has(POISON) && poisoned.length === 1 && poisoned[0]!.reason === "unprocessable" && rows.length === 1;
      const figures = `${others.filter((j) => stored.has(j)).length} of ${others.length} others stored; the poison ${stored.has(POISON) ? "stored (wrong)" : "not stored"}, recorded as ${poisoned.map((r) => r.reason).join(", ") || "nothing"}`;
      return { scenario: name, figures, published: others.length, lost: others.filter((j) => !stored.has(j)).length, duplicated: await duplicates(), met };
    }
    // Warm the workers up, so the first phase is not their compile time.
    await honest("warm");
    const base = await honest("alone");
    log(`  [${name}] honest peer alone at ${HONEST_RATE}/s: ${show(base.latency)}`);

    if (name === "f") {
      const tarpit = nc.subscribe(reportSubject("mallory", DESTINATION), { callback: () => undefined });
      let stop = false;
      const hostile = (async () => {
        for (let i = 0; !stop; i++) {
          const [event] = await sign(mallory, [`tarpit-${i}`]);
          await publishAll(nc, "mallory", [event!]);
          await sleep(1000 / TARPIT_RATE);
        }
      })();
      const under = await honest("tarpit");
      stop = true;
      await hostile;
      tarpit.unsubscribe();
      const met = judged(base.latency, under.latency);
      const figures = `honest p99 alone ${base.latency.p99.toFixed(1)} ms, with a report tarpit at ${TARPIT_RATE} ev/s ${under.latency.p99.toFixed(1)} ms (p50 ${base.latency.p50.toFixed(1)} → ${under.latency.p50.toFixed(1)} ms)`;
      return { scenario: name, figures, published: 2 * HONEST_RATE * HONEST_SECONDS, lost: base.lost + under.lost, duplicated: await duplicates(), met, alone: base.latency, withHostile: under.latency };
    }

    if (name === "g") {
      await ensureReportStream(jsm, "mallory", 1);
      // The backlog builds up while the workers (warm, running) cannot reach it: mallory's
      // consumer is taken away and put back, which they may not do themselves (manageStreams off).
      const malloryConsumer = inboxConsumerName(config.worker.consumer, "mallory");
      await jsm.consumers.delete(inboxStreamName(DESTINATION), malloryConsumer);
      const backlogJtis = Array.from({ length: BACKLOG }, (_, i) => `backlog-${i}`);
      await publishAll(nc, "mallory", await sign(mallory, backlogJtis));
      await ensureInbox(jsm, DESTINATION, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, [DESTINATION, "alpha", "mallory"]);
      const under = await honest("backlog");
      const malloryLeft = BACKLOG - (await committed("mallory")).size;
      await waitStored("mallory", backlogJtis, 300_000);
      const met = judged(base.latency, under.latency);
      const figures = `honest p99 alone ${base.latency.p99.toFixed(1)} ms, behind a ${BACKLOG}-event backlog ${under.latency.p99.toFixed(1)} ms (p50 ${base.latency.p50.toFixed(1)} → ${under.latency.p50.toFixed(1)} ms); ${malloryLeft} of the backlog still waiting when the honest peer was done`;
      return { scenario: name, figures, published: 2 * HONEST_RATE * HONEST_SECONDS, lost: base.lost + under.lost, duplicated: await duplicates(), met, alone: base.latency, withHostile: under.latency };
    }

    throw new Error(`no hostile scenario ${name}`);
  } finally {
    await Promise.all(workers.map((w) => w.stop()));
    await nc.close();
    await admin.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`).catch(() => undefined);
    await admin.end();
    await nats.stop();
  }
}
