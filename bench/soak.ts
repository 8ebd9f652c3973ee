/**
 * `npm run soak`: sustained load on one worker process. Starts its own
 * nats-server and a fresh Postgres schema, publishes pre-signed
 * single-recipient events at a fixed rate, and every few seconds samples the
 * worker's resident memory (/proc/PID/status VmRSS) and the consumer backlog
 * (num_pending + num_ack_pending). At the end it says whether memory levelled
 * off (mean RSS of the last third of the samples within 10 % of the middle
 * third) and, after a final drain, whether every published event was stored
 * exactly once. Exits non-zero unless both hold.
 *
 *   npm run soak -- [--rate 1000] [--seconds 60] [--interval S] [--json]
 *
 * With --json the lines go to stderr and stdout is one JSON object (`npm run -s`
 * keeps npm's own banner off stdout).
 */
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import pg from "pg";
import { loadConfig, type RelayConfig } from "../src/config.ts";
import { startLocalNats } from "../src/local-nats.ts";
import type { EventClaims } from "../src/protocol/claims.ts";
import { generateSigningJwk, importSigningKey } from "../src/protocol/keys.ts";
import { signEvent } from "../src/protocol/sign.ts";
import { inboxStreamName, inboxSubject } from "../src/protocol/subjects.ts";
import { messageId } from "../src/transport/publisher.ts";
import { inboxConsumerName } from "../src/transport/streams.ts";
import { freshDestination, startProcess, type BenchProcess } from "./fixtures.ts";

const { values: args } = parseArgs({
  options: {
    rate: { type: "string", default: "1000" },
    seconds: { type: "string", default: "60" },
    interval: { type: "string" },
    json: { type: "boolean", default: false },
  },
});
const RATE = Number(args.rate);
const SECONDS = Number(args.seconds);
// Every few seconds, and at least a dozen samples so each third has four.
const INTERVAL = Number(args.interval ?? Math.min(5, Math.max(1, SECONDS / 12)));
if (!(RATE > 0) || !(SECONDS > 0) || !(INTERVAL > 0)) {
  process.stderr.write("usage: npm run soak -- [--rate EVENTS_PER_SECOND] [--seconds S] [--interval S] [--json]\n");
  process.exit(2);
}
const TOTAL = Math.round(RATE * SECONDS);
const CLIENTS = 1000;
const PG_URL = process.env.DATABASE_URL ?? "postgresql://postgres@127.0.0.1:5432/test";
const SCHEMA = `soak_${process.pid}`;
/** Signed events kept ready ahead of the publisher. */
const AHEAD_SECONDS = 3;
/** Publishes awaiting their JetStream acknowledgement, at most. */
const MAX_IN_FLIGHT = 5000;
/** The final drain gives up after this long without progress. */
const DRAIN_STALL_MS = 60_000;

const out = (line: string): void => void (args.json ? process.stderr : process.stdout).write(`${line}\n`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const nats = await startLocalNats();
const nc = await connect({ servers: nats.url });
const js = jetstream(nc);
const jsm = await jetstreamManager(nc);
const admin = new pg.Pool({ connectionString: PG_URL, max: 2 });
const configPath = `/tmp/fedrelay-soak-${process.pid}.json`;
let worker: BenchProcess | undefined;

const alphaJwk = await generateSigningJwk("alpha", "soak", Math.floor(Date.now() / 1000) - 60);
const alpha = importSigningKey(alphaJwk);
const caps = Array.from({ length: CLIENTS }, () => randomBytes(32).toString("base64url"));
const body = randomBytes(1024).toString("base64url");
const run = randomBytes(4).toString("hex");

const config: RelayConfig = loadConfig({
  overrides: {
    homeserver: "soak", nats: { servers: [nats.url] }, postgres: { url: PG_URL, schema: SCHEMA, poolSize: 4 },
    http: { port: 0 }, peers: { alpha: { keys: [alpha.publicJwk] } }, log: { level: "warn" },
    // Far above the load: the soak measures the worker, not throttling or the backlog quota.
    rateLimits: {
      client: { rate: 1e9, burst: 1e9 }, senderClient: { rate: 1e9, burst: 1e9 }, sender: { rate: 1e9, burst: 1e9 },
    },
    inbox: { maxMessagesPerSender: Math.max(100_000, TOTAL * 2) },
  },
});

/** Event i, to client i mod CLIENTS with its capability. */
async function sign(i: number): Promise<Buffer> {
  const iat = Math.floor(Date.now() / 1000);
  const c = i % CLIENTS;
  const claims: EventClaims = {
    iss: "alpha", aud: "soak", jti: `s${run}-${i}`, iat, exp: iat + 86400, grp: "g@alpha", rcpt: [{ cid: `c${c}`, cap: caps[c]! }], body,
  };
  return Buffer.from(await signEvent(claims, alpha), "latin1");
}

/** Signs in chunks, keeping AHEAD_SECONDS of events ready; the publisher only takes from `ready`. */
const ready: Buffer[] = [];
let signed = 0;
async function signAhead(until: () => boolean): Promise<void> {
  const chunk = 100;
  while (signed < TOTAL && !until()) {
    if (ready.length >= RATE * AHEAD_SECONDS) {
      await sleep(20);
      continue;
    }
    const n = Math.min(chunk, TOTAL - signed);
    const batch = await Promise.all(Array.from({ length: n }, (_, k) => sign(signed + k)));
    signed += n;
    ready.push(...batch);
    // Let the publisher's timer in between chunks.
    await new Promise((r) => setImmediate(r));
  }
}

interface Sample { t: number; published: number; rssMb: number; backlog: number }

function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]) / 1024;
}

async function backlog(): Promise<number> {
  const info = await jsm.consumers.info(inboxStreamName("soak"), inboxConsumerName(config.worker.consumer, "alpha"));
  return info.num_pending + info.num_ack_pending;
}

async function countRows(table: "events" | "deliveries"): Promise<number> {
  const { rows } = await admin.query<{ n: string }>(`SELECT count(*) AS n FROM ${SCHEMA}.${table}`);
  return Number(rows[0]!.n);
}

function mean(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
}

let exitCode: number;
try {
  await freshDestination(admin, jsm, config, caps);

  // Sign the first chunk before the clock starts.
  const t0Sign = performance.now();
  await signAhead(() => ready.length >= Math.min(TOTAL, RATE * AHEAD_SECONDS));
  const signMs = performance.now() - t0Sign;
  out(`soak: ${TOTAL} events at ${RATE}/s for ${SECONDS} s, 1 recipient each, 1 worker; sampling every ${INTERVAL} s`);
  out(`soak: signed the first ${signed} in ${signMs.toFixed(0)} ms (${(signed / (signMs / 1000)).toFixed(0)}/s); the rest are signed ahead while publishing`);

  writeFileSync(configPath, JSON.stringify({ ...config, keys: { retired: [] } }));
  const w = await startProcess(["src/main.ts", "worker", "--config", configPath], { ready: / on http/ });
  worker = w;
  const pid = w.child.pid!;

  // Publish at a fixed rate: each tick sends what is due since the start.
  let published = 0;
  let sent = 0;
  let inFlight = 0;
  let failures = 0;
  let starved = 0;
  const retry: Buffer[] = [];
  const publish = (data: Buffer): void => {
    inFlight += 1;
    js.publish(inboxSubject("soak", "alpha"), data, { msgID: messageId(data), timeout: 10_000 }).then(
      () => { published += 1; },
      () => { failures += 1; retry.push(data); },
    ).finally(() => { inFlight -= 1; });
  };

  const samples: Sample[] = [];
  const t0 = performance.now();
  const elapsed = (): number => (performance.now() - t0) / 1000;
  const signer = signAhead(() => false);
  let nextSample = INTERVAL;
  const header = "    t  published      rss  backlog";
  out(header);
  while (sent < TOTAL || retry.length > 0) {
    if (w.exited()) throw new Error(`the worker exited with ${w.child.exitCode ?? w.child.signalCode}: ${w.stderr()}`);
    if (failures > 1000) throw new Error(`${failures} publishes failed; is nats-server overloaded?`);
    const due = Math.min(TOTAL, Math.floor(elapsed() * RATE));
    while (retry.length > 0 && inFlight < MAX_IN_FLIGHT) publish(retry.shift()!);
    while (sent < due && inFlight < MAX_IN_FLIGHT) {
      const data = ready.shift();
      if (!data) {
        starved += 1;
        break;
      }
      publish(data);
      sent += 1;
    }
    if (elapsed() >= nextSample) {
      const s: Sample = { t: Math.round(elapsed()), published, rssMb: rssMb(pid), backlog: await backlog() };
      samples.push(s);
      out(`${String(s.t).padStart(4)}s ${String(s.published).padStart(10)} ${s.rssMb.toFixed(1).padStart(6)} MB ${String(s.backlog).padStart(8)}`);
      nextSample += INTERVAL;
    }
    await sleep(5);
  }
  await signer;
  while (inFlight > 0 || retry.length > 0) {
    while (retry.length > 0) publish(retry.shift()!);
    await sleep(10);
  }
  const publishSeconds = elapsed();
  out(`soak: published ${published} in ${publishSeconds.toFixed(1)} s (${(published / publishSeconds).toFixed(0)}/s)${failures ? `, ${failures} publish failures retried` : ""}${starved ? `; the signer fell behind ${starved} times` : ""}`);

  // Final drain: the backlog to zero (giving up only when it stops shrinking).
  let last = await backlog();
  let progressAt = performance.now();
  while (last > 0) {
    if (w.exited()) throw new Error(`the worker exited with ${w.child.exitCode ?? w.child.signalCode}: ${w.stderr()}`);
    await sleep(200);
    const now = await backlog();
    if (now < last) progressAt = performance.now();
    else if (performance.now() - progressAt > DRAIN_STALL_MS) throw new Error(`drain stalled with a backlog of ${now}`);
    last = now;
  }
  const drainSeconds = elapsed() - publishSeconds;
  const stored = await countRows("events");
  const deliveries = await countRows("deliveries");
  const finalRssMb = rssMb(pid);

  const third = Math.floor(samples.length / 3);
  const middle = mean(samples.slice(third, 2 * third).map((s) => s.rssMb));
  const lastThird = mean(samples.slice(2 * third, 3 * third).map((s) => s.rssMb));
  const change = (lastThird - middle) / middle;
  const memoryOk = third > 0 && Math.abs(change) <= 0.1;
  const countsOk = stored === published && deliveries === published && published === TOTAL;

  out(`soak: drained in ${drainSeconds.toFixed(1)} s; worker RSS now ${finalRssMb.toFixed(1)} MB`);
  out(`memory: middle third ${middle.toFixed(1)} MB, last third ${lastThird.toFixed(1)} MB (${change >= 0 ? "+" : ""}${(change * 100).toFixed(1)} %): ${memoryOk ? "PASS" : "FAIL"}${third > 0 ? "" : " (too few samples)"}`);
  out(`events: published ${published}, stored ${stored}, deliveries ${deliveries}, lost ${published - stored}: ${countsOk ? "PASS" : "FAIL"}`);
  if (args.json) {
    process.stdout.write(`${JSON.stringify({
      rate: RATE, seconds: SECONDS, interval: INTERVAL, samples,
      memory: { middleThirdMb: middle, lastThirdMb: lastThird, change, pass: memoryOk },
      events: { total: TOTAL, published, stored, deliveries, lost: published - stored, publishFailures: failures, pass: countsOk },
      publishSeconds, drainSeconds, pass: memoryOk && countsOk,
    }, null, 2)}\n`);
  }
  exitCode = memoryOk && countsOk ? 0 : 1;
  await w.stop();
} catch (err) {
  out(`soak: ${(err as Error).message}`);
  exitCode = 1;
} finally {
  if (worker && !worker.exited()) worker.child.kill("SIGKILL");
  rmSync(configPath, { force: true });
  await nc.close();
  await admin.query(`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE`).catch(() => undefined);
  await admin.end();
  await nats.stop();
}
process.exit(exitCode);
