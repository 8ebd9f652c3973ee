/**
 * Keeps a process's streams and consumers as their specs say: checked at start,
 * every `intervalMs`, and at once when something fails on them (a pull that
 * finds its consumer gone). Where the relay may, it repairs; where it may not
 * (a hub), /readyz turns red with what is wrong.
 */
import type { JetStreamManager } from "@nats-io/jetstream";
import type { Logger } from "pino";
import type { RelayMetrics } from "../metrics.ts";
import { ensureSpec, StreamsUnreachable, type StreamSpec } from "./streams.ts";

export interface WatchTarget {
  readonly jsm: JetStreamManager;
  /** What it must be; a function when that changes at run time (an inbox's senders). */
  readonly spec: StreamSpec | (() => StreamSpec);
  /** Whether this process may create and change it (nats.manageStreams; the outbox always). */
  readonly manage: boolean;
}

export interface StreamWatch {
  /** What is wrong now; empty when all is well. */
  readonly problems: readonly string[];
  /**
   * Checks (and repairs) now; a check already running is joined. Rejects only if
   * `fatal` and a stream or consumer is missing, or NATS does not answer.
   */
  check(options?: { fatal?: boolean }): Promise<void>;
  close(): void;
}

export function watchStreams(targets: readonly WatchTarget[], deps: { intervalMs: number; log: Logger; metrics: RelayMetrics }): StreamWatch {
  let problems: string[] = [];
  let running: Promise<{ missing: string[]; unreachable?: string }> | undefined;
  let closed = false;

  const run = async (): Promise<{ missing: string[]; unreachable?: string }> => {
    const found: string[] = [];
    const missing: string[] = [];
    for (const t of targets) {
      const spec = typeof t.spec === "function" ? t.spec() : t.spec;
      let result;
      try {
        result = await ensureSpec(t.jsm, spec, t.manage);
      } catch (err) {
        // No answer (NATS or the way to the hub is down): /readyz says so under nats; keep what we knew.
        if (err instanceof StreamsUnreachable) {
          deps.log.debug({ err: err.message }, "streams not checked: NATS did not answer");
          return { missing: [], unreachable: err.message };
        }
        result = { ok: false as const, problem: `${spec.stream.name}: ${(err as Error).message}`, missing: false, repaired: [] as string[] };
      }
      for (const what of result.repaired) {
        deps.metrics.streamRepairs.inc({ stream: spec.stream.name });
        deps.log.warn({ stream: spec.stream.name, what }, "stream repaired");
      }
      if (!result.ok) {
        found.push(result.problem);
        if (result.missing) missing.push(result.problem);
      }
    }
    if (found.join("\n") !== problems.join("\n")) {
      if (found.length > 0) deps.log.error({ problems: found }, "streams are not as they should be");
      else deps.log.info("streams are as they should be again");
    }
    problems = found;
    return { missing };
  };

  const timer = setInterval(() => void watch.check().catch(() => undefined), deps.intervalMs);
  timer.unref();

  const watch: StreamWatch = {
    get problems() {
      return problems;
    },
    async check(options = {}) {
      if (closed) return;
      const pending = (running ??= run().finally(() => (running = undefined)));
      const { missing, unreachable } = await pending;
      if (options.fatal && unreachable !== undefined) throw new Error(`NATS did not answer about ${unreachable}`);
      if (options.fatal && missing.length > 0) throw new Error(missing.join("; "));
    },
    close() {
      closed = true;
      clearInterval(timer);
    },
  };
  return watch;
}
