/**
 * `npm run bench:e2e`: the whole job, end to end, as a user compares it with
 * what they would run instead. The owner's backend calls alpha's
 * `POST /v1/fanout` (which signs, splits and publishes); nats-server carries the
 * events to beta's inbox; beta's worker verifies and commits them; beta's
 * clients pick them up over HTTP (long-poll) and acknowledge. One group of
 * 1, 10 and 100 members, all on beta.
 *
 * Each process is its own (alpha `serve`, beta `worker`, beta `serve
 * --no-worker`, nats-server, Postgres), so CPU is counted per process; the load
 * generator (this process: the owner's backend and every client) is apart.
 * Prints, per group size: deliveries/s at the peak (fan-outs kept in flight),
 * CPU per delivered message by process, and publish-to-pickup latency p50/p99
 * at half the peak rate. Writes the table to docs/benchmarks.md ("End to end").
 *
 *   npm run bench:e2e [-- --groups 1,10,100 --messages N --latency-seconds S --smoke --json]
 *   (--cpu-prof DIR profiles every relay process: DIR/<alpha|beta-worker|beta-api>-<n>.cpuprofile)
 */
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import { cpus, totalmem } from "node:os";
import { parseArgs } from "node:util";
import pg from "pg";
import { loadConfig } from "../src/config.ts";
import { startLocalNats, type LocalNats } from "../src/local-nats.ts";
import { generateSigningJwk, importSigningKey } from "../src/protocol/keys.ts";
import { quoteIdent } from "../src/store/db.ts";
import { cpuSeconds, postgresCpuMeter, startProcess, WORKER_NODE_FLAGS, WORKER_NODE_OPTIONS, type BenchProcess } from "./fixtures.ts";

const { values: args } = parseArgs({
  options: {
    groups: { type: "string" }, messages: { type: "string" }, "latency-seconds": { type: "string" },
    smoke: { type: "boolean" }, json: { type: "boolean" }, "cpu-prof": { type: "string" },
  },
});
const smoke = args.smoke ?? false;
const GROUPS = (args.groups ?? "1,10,100").split(",").map(Number);
if (GROUPS.some((g) => !Number.isInteger(g) || g < 1 || g > 1000)) {
  process.stderr.write("bench:e2e: --groups must be group sizes of 1–1000, comma-separated\n");
  process.exit(2);
}
/** Fan-outs per group size at the peak: about as many deliveries each (more messages to small groups). */
const messagesFor = (group: number): number => Number(args.messages ?? (smoke ? 20 : Math.max(300, Math.round(20_000 / group))));
/** Measured after this many have been picked up: a fresh process compiles its hot path as it goes. */
const warmupFor = (messages: number): number => Math.floor(messages / 5);
const LATENCY_SECONDS = Number(args["latency-seconds"] ?? (smoke ? 2 : 8));
/** Fan-out requests in flight at the peak: enough to keep every stage busy, as many owners' backends would. */
const IN_FLIGHT = 32;
/** 1 KiB of message, as `npm run bench` signs. */
const BODY = randomBytes(768).toString("base64url");
const PG_URL = "postgresql://postgres@127.0.0.1:5432/test";
const SCHEMAS = { alpha: "bench_e2e_alpha", beta: "bench_e2e_beta" } as const;
const log = (line: string): void => void (args.json ? process.stderr : process.stdout).write(`${line}\n`);

interface Member { readonly client: string; readonly token: string; readonly capability: string }

/**
 * The load generator's HTTP client: node:http with kept-alive connections rather than
 * fetch, which cost it about twice the CPU a request, and the load generator shares the
 * machine's cores with what it measures.
 */
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

/**
 * One request; sent again once if the connection was closed under it (a kept-alive
 * connection the server closed as idle just as it was reused). Every request here may be
 * repeated: fan-outs carry an id, acknowledgements and reads are idempotent.
 */
async function call(url: string, init: { method?: string; token: string; body?: unknown }): Promise<Record<string, unknown>> {
  try {
    return await request(url, init);
  } catch (err) {
    if (!["ECONNRESET", "EPIPE"].includes((err as { code?: string }).code ?? "")) throw err;
    return request(url, init);
  }
}

function request(url: string, init: { method?: string; token: string; body?: unknown }): Promise<Record<string, unknown>> {
  const body = init.body === undefined ? undefined : JSON.stringify(init.body);
  return new Promise((resolve, reject) => {
    const req = http.request(url, {
      agent, method: init.method ?? "GET",
      headers: { authorization: `Bearer ${init.token}`, ...(body === undefined ? {} : { "content-type": "application/json", "content-length": Buffer.byteLength(body) }) },
    }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("error", reject);
      res.on("end", () => {
        try {
          const json = JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>;
          if (res.statusCode! >= 400) reject(new Error(`${init.method ?? "GET"} ${url}: ${res.statusCode} ${JSON.stringify(json)}`));
          else resolve(json);
        } catch (err) {
          reject(err as Error);
        }
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}


/** The processes of one case: alpha (API and worker), beta's worker and beta's API, on their own nats-server. */
interface Federation {
  readonly nats: LocalNats;
  readonly alpha: BenchProcess & { url: string };
  readonly betaWorker: BenchProcess;
  readonly betaApi: BenchProcess & { url: string };
  readonly serviceToken: string;
  stop(): Promise<void>;
}

let profiled = 0;

async function startFederation(admin: pg.Pool): Promise<Federation> {
  for (const schema of Object.values(SCHEMAS)) await admin.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`);
  const nats = await startLocalNats();
  const serviceToken = randomBytes(24).toString("base64url");
  const now = Math.floor(Date.now() / 1000) - 60;
  const keys = { alpha: await generateSigningJwk("alpha", "e2e", now), beta: await generateSigningJwk("beta", "e2e", now) };
  const configFile = (self: "alpha" | "beta", peer: "alpha" | "beta"): string => {
    const config = loadConfig({
      overrides: {
        homeserver: self, nats: { servers: [nats.url] }, postgres: { url: PG_URL, schema: SCHEMAS[self], poolSize: 4 },
        http: { port: 0, serviceToken }, keys: { signingKey: keys[self] }, peers: { [peer]: { keys: [importSigningKey(keys[peer]).publicJwk] } },
        log: { level: "warn" },
        // Limits that never bind here: the bench measures the work, and it is the same work with them on.
        rateLimits: { client: { rate: 1e6, burst: 1e6 }, senderClient: { rate: 1e6, burst: 1e6 }, servers: { [peer]: { rate: 1e9, burst: 1e9 } } },
      },
    });
    const path = `/tmp/fedrelay-e2e-${process.pid}-${self}.json`;
    writeFileSync(path, JSON.stringify({ ...config, keys: { ...config.keys, retired: [] } }));
    return path;
  };
  const env = { ...process.env, NODE_OPTIONS: WORKER_NODE_OPTIONS };
  const start = async (name: string, argv: string[]): Promise<BenchProcess & { url: string }> => {
    const profile = args["cpu-prof"] ? ["--cpu-prof", `--cpu-prof-dir=${args["cpu-prof"]}`, `--cpu-prof-name=${name}-${++profiled}.cpuprofile`] : [];
    const p = await startProcess([...WORKER_NODE_FLAGS, ...profile, "src/main.ts", ...argv], { ready: / on http:\/\/\S+/, env });
    return Object.assign(p, { url: / on (http:\/\/[^\s"]+)/.exec(p.stderr())![1]! });
  };
  const alphaPath = configFile("alpha", "beta");
  const betaPath = configFile("beta", "alpha");
  // The worker first: it creates beta's inbox, which alpha's first fan-out publishes to.
  const betaWorker = await start("beta-worker", ["worker", "--config", betaPath]);
  const [alpha, betaApi] = await Promise.all([start("alpha", ["serve", "--config", alphaPath]), start("beta-api", ["serve", "--no-worker", "--config", betaPath])]);
  return {
    nats, alpha, betaWorker, betaApi, serviceToken,
    async stop() {
      await Promise.all([alpha.stop(), betaWorker.stop(), betaApi.stop()]);
      await nats.stop();
    },
  };
}

/** beta registers `n` clients and gives each a token; each asks beta for a capability for alpha's group. */
async function members(f: Federation, n: number): Promise<Member[]> {
  const out: Member[] = [];
  for (let i = 0; i < n; i++) {
    const client = `m${i}`;
    await call(`${f.betaApi.url}/v1/clients/${client}`, { method: "PUT", token: f.serviceToken });
    const token = (await call(`${f.betaApi.url}/v1/clients/${client}/tokens`, { method: "POST", token: f.serviceToken })).token as string;
    const capability = (await call(`${f.betaApi.url}/v1/capabilities`, { method: "POST", token, body: { group: "g@alpha" } })).capability as string;
    out.push({ client, token, capability });
  }
  return out;
}

/**
 * Every member picks up until it has `expected` messages, long-polling and
 * acknowledging each page, as a client would; `onMessage(seq, at)` hears of
 * each (the fan-out's `seq` is its index).
 */
function pickUp(f: Federation, group: readonly Member[], expected: number, onMessage: (seq: number, at: number) => void): Promise<void> {
  return Promise.all(group.map(async (m) => {
    let after = 0;
    let got = 0;
    while (got < expected) {
      const page = await call(`${f.betaApi.url}/v1/messages?after=${after}&wait=10&limit=1000`, { token: m.token });
      const messages = page.messages as { cursor: number; seq: number }[];
      if (messages.length === 0) continue;
      const at = performance.now();
      for (const message of messages) onMessage(message.seq, at);
      got += messages.length;
      after = messages.at(-1)!.cursor;
      await call(`${f.betaApi.url}/v1/messages/ack`, { method: "POST", token: m.token, body: { through: after } });
    }
  })).then(() => undefined);
}

function fanout(f: Federation, group: readonly Member[], seq: number): Promise<unknown> {
  return call(`${f.alpha.url}/v1/fanout`, {
    method: "POST", token: f.serviceToken,
    body: { id: `e2e-${seq}`, group: "g@alpha", body: BODY, seq, recipients: group.map((m) => ({ server: "beta", client: m.client, capability: m.capability })) },
  });
}

/** CPU ms per delivered message, by process; the load generator's apart from the total. */
interface CpuSplit { owner: number; nats: number; workers: number; postgres: number; api: number; total: number; loadGenerator: number }

function cpuMeter(f: Federation): (deliveries: number) => CpuSplit {
  const pids = { owner: f.alpha.child.pid!, nats: f.nats.pid!, workers: f.betaWorker.child.pid!, api: f.betaApi.child.pid! };
  const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSeconds(pid)])) as Record<keyof typeof pids, number>;
  const postgres = postgresCpuMeter();
  const generator = process.cpuUsage();
  return (deliveries) => {
    const per = (seconds: number): number => (seconds * 1000) / deliveries;
    const of = (k: keyof typeof pids): number => per(cpuSeconds(pids[k]) - before[k]);
    const split = { owner: of("owner"), nats: of("nats"), workers: of("workers"), postgres: per(postgres()), api: of("api") };
    const own = process.cpuUsage(generator);
    return { ...split, total: split.owner + split.nats + split.workers + split.postgres + split.api, loadGenerator: per((own.user + own.system) / 1e6) };
  };
}

interface Result {
  group: number; messages: number; deliveriesPerSec: number; messagesPerSec: number; cpu: CpuSplit;
  latency: { rate: number; deliveries: number; p50: number; p99: number };
}

async function runCase(admin: pg.Pool, size: number): Promise<Result> {
  const f = await startFederation(admin);
  try {
    const group = await members(f, size);
    const messages = messagesFor(size);
    const warmup = warmupFor(messages);

    // The peak: IN_FLIGHT fan-outs at a time, clients picking up as they go. The warm-up messages
    // go through first, on their own; the meters cover the rest, from the first send to the last pickup.
    const peak = async (from: number, to: number): Promise<void> => {
      const picking = pickUp(f, group, to - from, () => undefined);
      let next = from;
      await Promise.all(Array.from({ length: IN_FLIGHT }, async () => {
        while (next < to) await fanout(f, group, next++);
      }));
      await picking;
    };
    await peak(0, warmup);
    const meter = cpuMeter(f);
    const began = performance.now();
    await peak(warmup, messages);
    const elapsed = (performance.now() - began) / 1000;
    const measured = (messages - warmup) * size;
    const cpu = meter(measured);
    const deliveriesPerSec = measured / elapsed;

    // Latency at half the peak's message rate: each fan-out sent on schedule, each delivery timed from its send to its pickup.
    const rate = Math.max(1, Math.round(deliveriesPerSec / size / 2));
    const count = Math.max(1, Math.round(rate * LATENCY_SECONDS));
    const offset = messages;
    const sentAt = new Map<number, number>();
    const latencies: number[] = [];
    const timing = pickUp(f, group, count, (seq, at) => { latencies.push(at - sentAt.get(seq)!); });
    const start = performance.now();
    const sends: Promise<unknown>[] = [];
    for (let i = 0; i < count; i++) {
      const due = start + (i * 1000) / rate;
      const wait = due - performance.now();
      if (wait > 1) await new Promise((r) => setTimeout(r, wait));
      sentAt.set(offset + i, performance.now());
      sends.push(fanout(f, group, offset + i));
    }
    await Promise.all(sends);
    await timing;
    latencies.sort((a, b) => a - b);
    const pct = (p: number): number => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))]!;
    return {
      group: size, messages, deliveriesPerSec, messagesPerSec: deliveriesPerSec / size, cpu,
      latency: { rate, deliveries: latencies.length, p50: pct(50), p99: pct(99) },
    };
  } finally {
    await f.stop();
  }
}

const admin = new pg.Pool({ connectionString: PG_URL, max: 2 });
const results: Result[] = [];
const ms = (x: number): string => x.toFixed(3);
try {
  for (const size of GROUPS) {
    log(`group of ${size}: ${messagesFor(size)} fan-outs at the peak, then ${LATENCY_SECONDS} s at half its rate…`);
    const r = await runCase(admin, size);
    results.push(r);
    log(`  ${r.deliveriesPerSec.toFixed(0)} deliveries/s (${r.messagesPerSec.toFixed(0)} fan-outs/s); CPU ms per delivered message: total ${ms(r.cpu.total)}` +
      ` (owner ${ms(r.cpu.owner)}, nats ${ms(r.cpu.nats)}, workers ${ms(r.cpu.workers)}, postgres ${ms(r.cpu.postgres)}, api ${ms(r.cpu.api)}); load generator ${ms(r.cpu.loadGenerator)}`);
    log(`  at ${r.latency.rate} fan-outs/s: publish to pickup p50 ${r.latency.p50.toFixed(1)} ms, p99 ${r.latency.p99.toFixed(1)} ms (${r.latency.deliveries} deliveries)`);
  }
  const machine = `${cpus().length} × ${cpus()[0]?.model.trim()}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, Node ${process.version}`;
  if (args.json) process.stdout.write(`${JSON.stringify({ machine, smoke, results }, null, 2)}\n`);
  if (!smoke && !args.json) writeSection(machine);
} finally {
  for (const schema of Object.values(SCHEMAS)) await admin.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`).catch(() => undefined);
  await admin.end();
}

/** Replaces docs/benchmarks.md's "End to end" section (bench/run.ts keeps it when it rewrites the rest). */
function writeSection(machine: string): void {
  const section = [
    "## End to end", "",
    `\`npm run bench:e2e\` on ${machine}: alpha's \`POST /v1/fanout\` (sign, publish) through one local nats-server to beta's worker (verify, commit) and out to beta's clients picking up over HTTP long-poll and acknowledging each page; groups of 1, 10 and 100 members, all on beta, 1 KiB messages. Each homeserver part is its own process, and CPU is counted for each (alpha's API and worker as "owner"; Postgres serves both); the load generator (the owner's backend and every client) is apart. The peak keeps ${IN_FLIGHT} fan-outs in flight; latency is from sending a fan-out to a client receiving it, at half the peak's fan-out rate. On a machine of two cores the load generator competes with what it measures (its CPU per delivered message is the column before the latency: every client makes a long-poll and an acknowledgement per page), so the rates and latencies here are of the whole machine, not of the relay alone. Latency grows with the group at half the peak because pickups are then small pages: every member's long-poll is woken by every commit, and each wake-up and acknowledgement is a query on the API's pool of 4 connections (100 members at 40 fan-outs/s are ~16,000 statements a second), where at the peak pages are large.`,
    "",
    "| group | deliveries/s | CPU ms per delivered message (owner / nats / worker / postgres / beta API) | total | load generator | latency at half the peak: p50 / p99 |",
    "|---:|---:|---|---:|---:|---|",
    ...results.map((r) => `| ${r.group} | ${r.deliveriesPerSec.toFixed(0)} | ${ms(r.cpu.owner)} / ${ms(r.cpu.nats)} / ${ms(r.cpu.workers)} / ${ms(r.cpu.postgres)} / ${ms(r.cpu.api)} | ${ms(r.cpu.total)} | ${ms(r.cpu.loadGenerator)} | ${r.latency.p50.toFixed(1)} / ${r.latency.p99.toFixed(1)} ms at ${r.latency.rate} fan-outs/s |`),
    "",
    `Command: \`npm run bench:e2e\` (${new Date().toISOString().slice(0, 10)}).`, "",
  ].join("\n");
  const path = "docs/benchmarks.md";
  const text = readFileSync(path, "utf8");
  const at = text.indexOf("\n## End to end");
  writeFileSync(path, `${(at < 0 ? text : text.slice(0, at)).trimEnd()}\n\n${section}`);
}
