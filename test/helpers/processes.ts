/** fedrelay processes as operators run them: `node src/main.ts COMMAND …` (workers, and one-shot commands). */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = fileURLToPath(new URL("../..", import.meta.url));

export interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
  readonly ms: number;
}

/**
 * The environment of a child: the machine's, minus anything that configures
 * fedrelay (the test runner sets FEDRELAY_* variables of its own).
 */
export function baseEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("FEDRELAY_") || k === "DATABASE_URL" || k === "NATS_URL") continue;
    env[k] = v;
  }
  return env;
}

export function runFedrelay(args: readonly string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const child = spawn(process.execPath, ["src/main.ts", ...args], {
      cwd: REPO, env: { ...baseEnv(), ...env }, stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, ms: Date.now() - started });
    });
  });
}

export interface WorkerProcess {
  readonly child: ChildProcess;
  /** Its /metrics, /healthz, /readyz server. */
  readonly url: string;
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>;
  stderr(): string;
}

export async function writeConfigFile(config: object): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "fedrelay-cfg-"));
  const path = join(dir, "config.json");
  await writeFile(path, JSON.stringify(config));
  return path;
}

export async function startWorkerProcess(configPath: string, command: "worker" | "serve" = "worker"): Promise<WorkerProcess> {
  const child = spawn(process.execPath, ["src/main.ts", command, "--config", configPath], {
    cwd: REPO,
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, FEDRELAY_CONFIG: undefined },
  });
  let err = "";
  child.stderr!.setEncoding("utf8");
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`worker did not start: ${err}`)), 20_000);
    child.stderr!.on("data", (chunk: string) => {
      err += chunk;
      const match = / on (http:\/\/\S+)/.exec(err);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]!);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`worker exited with ${code}: ${err}`));
    });
  });
  return {
    child,
    url,
    stderr: () => err,
    stop() {
      if (child.exitCode !== null) return Promise.resolve(child.exitCode);
      return new Promise((resolve) => {
        child.once("exit", (code) => resolve(code));
        child.kill("SIGTERM");
      });
    },
  };
}
