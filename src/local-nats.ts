/**
 * Starts nats-server processes on free loopback ports, each with its own store
 * directory: for the demo, tests, benchmarks and the chaos suite (as nats.js's
 * own tests do). Never touches the machine's server at 4222.
 */
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const FETCH_SCRIPT = join(ROOT, "scripts/fetch-nats-server.sh");

/** The cached 2.10+ binary, fetched on first use (scripts/fetch-nats-server.sh). */
export async function natsServerBinary(explicit?: string): Promise<string> {
  if (explicit) return explicit;
  const cached = join(ROOT, ".cache/nats-server/nats-server");
  if (existsSync(cached)) return cached;
  const { stdout } = await promisify(execFile)("bash", [FETCH_SCRIPT], { encoding: "utf8" });
  return stdout.trim();
}

export interface LocalNatsOptions {
  readonly binary?: string;
  /** fsync every write before acknowledging (DESIGN §4); off keeps tests fast. */
  readonly syncAlways?: boolean;
  readonly extraConfig?: string;
  /** A fixed client port (cluster nodes); default: any free one. */
  readonly port?: number;
  /** A whole config of its own (a generated hub or leaf config), instead of the one built here. */
  readonly config?: string;
}

export interface LocalNats {
  readonly url: string;
  readonly port: number;
  readonly storeDir: string;
  /** The running server's process id (the bench accounts its CPU time). */
  readonly pid: number | undefined;
  /** SIGKILL, as a crash would. */
  kill(): Promise<void>;
  /** Start again on the same port and store. */
  restart(): Promise<void>;
  /** Replace the config file and have the running server reload it (SIGHUP), as an operator would. */
  reload(config?: string): Promise<void>;
  stop(): Promise<void>;
}

function parsedOrUndefined(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

async function waitForPortsFile(dir: string, child: ChildProcess, ms = 10_000): Promise<number> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`nats-server exited with ${child.exitCode}`);
    const file = (await readdir(dir)).find((f) => f.endsWith(".ports") && f.includes(`_${child.pid}.`));
    if (file) {
      // nats-server creates the file, then writes it: read too soon, it is empty or cut short (seen in CI).
      const ports = parsedOrUndefined(await readFile(join(dir, file), "utf8")) as { nats?: string[] } | undefined;
      if (ports?.nats?.[0] !== undefined) return Number(new URL(ports.nats[0]).port);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error("nats-server did not report its ports in time");
}

export async function startLocalNats(options: LocalNatsOptions = {}): Promise<LocalNats> {
  const binary = await natsServerBinary(options.binary);
  const dir = await mkdtemp(join(tmpdir(), "fedrelay-nats-"));
  const storeDir = join(dir, "js");
  const conf = join(dir, "nats.conf");
  let port = options.port ?? -1;
  let own = options.config;
  const writeConf = (): Promise<void> => writeFile(conf, own ?? [
    `listen: "127.0.0.1:${port}"`,
    `jetstream { store_dir: "${storeDir}"${options.syncAlways ? ", sync_interval: always" : ""} }`,
    options.extraConfig ?? "",
  ].join("\n"));

  let child: ChildProcess | undefined;
  const launch = async (): Promise<void> => {
    await writeConf();
    const proc = spawn(binary, ["-c", conf, "--ports_file_dir", dir], { stdio: "ignore" });
    child = proc;
    port = await waitForPortsFile(dir, proc);
  };
  const exited = (proc: ChildProcess): Promise<void> =>
    proc.exitCode !== null || proc.signalCode !== null ? Promise.resolve() : new Promise((r) => proc.once("exit", () => r()));

  await launch();
  const server: LocalNats = {
    get url() { return `nats://127.0.0.1:${port}`; },
    get port() { return port; },
    get pid() { return child?.pid; },
    storeDir,
    async kill() {
      if (!child) return;
      const proc = child;
      child = undefined;
      proc.kill("SIGKILL");
      await exited(proc);
      for (const f of (await readdir(dir)).filter((f) => f.endsWith(".ports"))) await rm(join(dir, f), { force: true });
    },
    async restart() {
      await server.kill();
      await launch();
    },
    async reload(config) {
      if (config !== undefined) own = config;
      await writeConf();
      child?.kill("SIGHUP");
      // The server applies a reload at once; a moment lets it finish before the caller connects.
      await new Promise((r) => setTimeout(r, 200));
    },
    async stop() {
      if (child) {
        const proc = child;
        child = undefined;
        proc.kill("SIGTERM");
        await exited(proc);
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
  return server;
}

/** A free loopback TCP port (a cluster's route ports must be known before any node starts). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

export interface LocalCluster {
  readonly nodes: readonly LocalNats[];
  /** Every node's client URL, for a connection that fails over. */
  readonly urls: readonly string[];
  stop(): Promise<void>;
}

/** `size` nats-server nodes routed into one JetStream cluster, each with its own store. */
export async function startLocalCluster(size = 3, options: LocalNatsOptions = {}): Promise<LocalCluster> {
  // A new cluster now and then never makes one of its servers a peer for placement: seen in CI
  // (chaos d), three servers routed to each other, R1 and R2 streams placed on two of them, R3
  // refused "no suitable peers for placement" for minutes. Such a cluster is started afresh.
  for (let attempt = 1; ; attempt++) {
    const cluster = await startClusterOnce(size, options);
    try {
      await waitForJetStream(cluster.urls, size, 15_000);
      return cluster;
    } catch (err) {
      await cluster.stop();
      if (attempt === 3) throw err;
    }
  }
}

async function startClusterOnce(size: number, options: LocalNatsOptions): Promise<LocalCluster> {
  const clusterPorts = await Promise.all(Array.from({ length: size }, () => freePort()));
  const clientPorts = await Promise.all(Array.from({ length: size }, () => freePort()));
  const routes = clusterPorts.map((p) => `"nats-route://127.0.0.1:${p}"`).join(", ");
  const nodes = await Promise.all(clusterPorts.map((cport, i) => startLocalNats({
    ...options,
    port: clientPorts[i]!,
    extraConfig: [
      `server_name: "n${i + 1}"`,
      `cluster { name: "fedrelay-test", listen: "127.0.0.1:${cport}", routes: [${routes}] }`,
      options.extraConfig ?? "",
    ].join("\n"),
  })));
  return {
    nodes,
    urls: nodes.map((n) => n.url),
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()));
    },
  };
}

/**
 * A new cluster answers JetStream requests only once it has elected a meta leader, and
 * places a replicated stream only on peers that have reported to that leader, some time
 * later: until then a stream of `replicas` fails "no suitable peers for placement" (seen
 * in CI, chaos d). With `replicas` over 1, a probe stream is created until it can be.
 */
export async function waitForJetStream(urls: readonly string[], replicas = 1, ms = 30_000): Promise<void> {
  const nc = await connect({ servers: [...urls] });
  try {
    const deadline = Date.now() + ms;
    for (;;) {
      try {
        const jsm = await jetstreamManager(nc, { timeout: 1000 });
        if (replicas > 1) {
          const name = "FEDRELAY_PLACEMENT_PROBE";
          await jsm.streams.add({ name, subjects: ["fedrelay.placement-probe"], num_replicas: replicas, max_bytes: 1024 * 1024 });
          await jsm.streams.delete(name);
        }
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  } finally {
    await nc.close();
  }
}
