/** Set-up shared by bench, chaos and soak: a fresh destination, and the worker processes. */
import { spawn, type ChildProcess } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { JetStreamManager } from "@nats-io/jetstream";
import { headers, type NatsConnection } from "@nats-io/transport-node";
import type pg from "pg";
import type { RelayConfig } from "../src/config.ts";
import { capabilityHash } from "../src/policy/capabilities.ts";
import { subjectToken } from "../src/protocol/names.ts";
import { inboxStreamName } from "../src/protocol/subjects.ts";
import { createDb, quoteIdent } from "../src/store/db.ts";
import { migrate } from "../src/store/migrate.ts";
import { messageId } from "../src/transport/publisher.ts";
import { ensureInbox } from "../src/transport/streams.ts";

/**
 * Drops and re-creates the homeserver's schema and inbox stream, with clients
 * `c0…c<n-1>`, each holding the capability `caps[i]` for group `g@alpha`.
 */
export async function freshDestination(admin: pg.Pool, jsm: JetStreamManager, config: RelayConfig, caps: readonly string[]): Promise<void> {
  const schema = config.postgres.schema;
  await admin.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`);
  await jsm.streams.delete(inboxStreamName(config.homeserver)).catch(() => undefined);
  const db = createDb(config.postgres);
  try {
    await migrate(db.pool, schema);
    const ids = caps.map((_, c) => `c${c}`);
    await db.pool.query("INSERT INTO clients (id) SELECT unnest($1::text[])", [ids]);
    await db.pool.query(
      "INSERT INTO capabilities (id, hash, client_id, grp, owner) SELECT 'cap' || c, h, c, 'g@alpha', 'alpha' FROM unnest($1::text[], $2::bytea[]) AS t(c, h)",
      [ids, caps.map((c) => capabilityHash(c))],
    );
  } finally {
    await db.close();
  }
  await ensureInbox(jsm, config.homeserver, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker,
    [config.homeserver, ...Object.keys(config.peers)].map(subjectToken));
}

/**
 * Publishes `events` to `subject` at `rate` a second, as a homeserver fanning out would:
 * asynchronously, each with its message id and a reply subject, the acknowledgements counted
 * on one subscription. Returns each event's send time (ms) by index; `beforeSend(i)` runs just
 * before event i goes. Throws, once all are acknowledged, if JetStream refused any.
 * Kept lean, for the load generator shares the machine's cores with what it measures: with
 * js.publish (a request, a timer and promises per event) and a Map of send times, it took 45
 * instead of 30 ms of CPU per 1,000 events, and its scavenges grew to 47 ms as a run went on,
 * each sending the events due meanwhile in one burst.
 */
let paced = 0;
export async function publishAtRate(
  nc: NatsConnection, subject: string, events: readonly Uint8Array[], rate: number, beforeSend?: (i: number) => void,
): Promise<Float64Array> {
  const sentAt = new Float64Array(events.length);
  const ackSubject = `_INBOX.bench.${process.pid}.${++paced}`;
  let acknowledged = 0;
  let failure: string | undefined;
  let allAcknowledged = (): void => undefined;
  const acks = nc.subscribe(`${ackSubject}.*`, {
    callback: (err, m) => {
      // A JetStream acknowledgement is {"stream":…,"seq":…}; a refusal carries "error".
      if (err) failure ??= err.message;
      else if (/"error"/.test(m.string())) failure ??= m.string();
      if (++acknowledged === events.length) allAcknowledged();
    },
  });
  const t0 = Date.now();
  for (let i = 0; i < events.length; i++) {
    beforeSend?.(i);
    const wait = t0 + (i * 1000) / rate - Date.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    const h = headers();
    h.set("Nats-Msg-Id", messageId(events[i]!));
    sentAt[i] = Date.now();
    nc.publish(subject, events[i]!, { reply: `${ackSubject}.${i}`, headers: h });
  }
  if (acknowledged < events.length) await new Promise<void>((resolve) => (allAcknowledged = resolve));
  acks.unsubscribe();
  if (failure) throw new Error(`an event to ${subject} was not stored: ${failure}`);
  return sentAt;
}

const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** The relay's processes run with the heap settings deploy/ recommends (docs/operations.md, "Memory"), in benchmarks too. */
export const WORKER_NODE_OPTIONS = "--max-old-space-size=1024 --max-semi-space-size=8";
/** Flags NODE_OPTIONS does not accept, on the command line as deploy/ has them. */
export const WORKER_NODE_FLAGS: readonly string[] = ["--initial-old-space-size=64"];

export interface BenchProcess {
  readonly child: ChildProcess;
  /** Everything it wrote to stderr so far. */
  stderr(): string;
  exited(): boolean;
  /** SIGTERM, and its exit (at once if it already exited). */
  stop(): Promise<void>;
}

/**
 * `node ARGV…` from the repository root, resolved once its stderr matches
 * `ready` (a relay worker prints "… on http://…"), rejected if it exits first.
 * `onExit` hears of an exit after that, for a crash nobody caused.
 */
export function startProcess(
  argv: readonly string[],
  options: { ready: RegExp; env?: NodeJS.ProcessEnv; onExit?: (code: number | null, signal: NodeJS.Signals | null, stderr: string) => void },
): Promise<BenchProcess> {
  const child = spawn(process.execPath, argv, { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"], env: options.env ?? process.env });
  let err = "";
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const handle: BenchProcess = {
    child,
    stderr: () => err,
    exited,
    stop: () => (exited() ? Promise.resolve() : new Promise((resolve) => { child.once("exit", () => resolve()); child.kill("SIGTERM"); })),
  };
  return new Promise((resolve, reject) => {
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (d: string) => {
      err += d;
      if (options.ready.test(err)) resolve(handle);
    });
    child.once("exit", (code, signal) => {
      reject(new Error(`${argv.join(" ")} exited ${code ?? signal}: ${err}`));
      options.onExit?.(code, signal, err);
    });
  });
}

/** CPU seconds (user + system) a process has used; 0 once it is gone. Linux clock ticks are 1/100 s. */
export function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return 0;
  }
}

/** Every Postgres process on the machine (the server and its backends). */
const postgresPids = (): number[] =>
  readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number).filter((pid) => {
    try { return readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "postgres"; } catch { return false; }
  });

/** CPU seconds all Postgres processes have used since the call; a backend that came and went meanwhile counts from when first seen. */
export function postgresCpuMeter(): () => number {
  const before = new Map(postgresPids().map((pid) => [pid, cpuSeconds(pid)]));
  return () => postgresPids().reduce((t, pid) => t + cpuSeconds(pid) - (before.get(pid) ?? 0), 0);
}
