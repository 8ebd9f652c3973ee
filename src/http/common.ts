/** Shared by the route modules: what the API needs, request parsing, and long-polls. */
import type { z } from "zod";
import type { ClientTokens } from "../client-tokens.ts";
import { RelayError } from "../errors.ts";
import type { FanoutRequest, FanoutResult } from "../fanout.ts";
import type { RelayMetrics } from "../metrics.ts";
import type { Db } from "../store/db.ts";
import type { DeliveryNotifier } from "../store/notifier.ts";
import type { PolicyWatcher } from "../store/server-policy.ts";
import type { ServiceAuth } from "./auth.ts";
import type { WaitSlots } from "./limits.ts";

export interface ApiDeps {
  readonly self: string;
  readonly db: Db;
  readonly metrics: RelayMetrics;
  readonly notifier: DeliveryNotifier;
  readonly fanout: { fanout(request: FanoutRequest): Promise<FanoutResult> };
  readonly clientTokens: ClientTokens;
  readonly serviceAuth: ServiceAuth;
  readonly policy: PolicyWatcher;
  readonly jwks: () => { keys: readonly object[] };
  readonly maxWaitSeconds: number;
  /** Long-polls in progress, per client and in all. */
  readonly waits: WaitSlots;
  /** A fan-out request's body: one message body plus its recipient list. */
  readonly fanoutBodyLimit: number;
}

/** A 400 naming the field, from the first issue zod found. */
export function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const result = schema.safeParse(value);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const path = issue.path.join(".");
    throw new RelayError("bad_request", `${what}${path ? ` ${path}` : ""}: ${issue.message}`);
  }
  return result.data;
}

/**
 * Waits up to `seconds` for `check` to return something, waking on any of
 * the notifier's `keys`. The waiter is registered before each check, so a commit
 * between the check and the wait still wakes it. A wait holds one of the
 * `holder`'s slots (api.waits: a client's id, or undefined for the backend);
 * with none free it is refused 429 at once.
 */
export async function longPoll<T>(
  api: ApiDeps, holder: string | undefined, keys: readonly string[], seconds: number, check: () => Promise<T | undefined>,
  /** The caller hung up: stop waiting and give the slot back at once, not when the wait would have ended. */
  gone?: AbortSignal,
): Promise<T | undefined> {
  if (seconds <= 0) return check();
  const slot = api.waits.acquire(holder);
  if (!slot.ok) {
    api.metrics.httpWaitsRefused.inc({ limit: slot.limit });
    // A client over its own cap has other waits open, each answering within maxWaitSeconds;
    // a full process frees slots continually.
    const retryAfterSeconds = slot.limit === "holder" ? Math.max(1, api.maxWaitSeconds) : 1;
    throw new RelayError("too_many_requests", slot.limit === "holder"
      ? `at most ${api.waits.perHolder} waiting requests at once per client`
      : "this server holds as many waiting requests as it takes; retry shortly", { retryAfterSeconds });
  }
  api.metrics.httpWaiting.inc();
  const hungUp = new Promise<void>((resolve) => {
    if (gone?.aborted) resolve();
    gone?.addEventListener("abort", () => resolve(), { once: true });
  });
  try {
    const deadline = Date.now() + seconds * 1000;
    for (;;) {
      const remaining = deadline - Date.now();
      const waiters = remaining > 0 && !gone?.aborted ? keys.map((key) => api.notifier.waiter(key, remaining)) : [];
      const value = await check();
      if (value !== undefined || waiters.length === 0) {
        for (const w of waiters) w.cancel();
        return value;
      }
      await Promise.race([...waiters.map((w) => w.promise), hungUp]);
      for (const w of waiters) w.cancel();
      if (gone?.aborted) return undefined;
      // Shutting down: one last look, then answer.
      if (api.notifier.closed) return await check();
    }
  } finally {
    slot.release();
    api.metrics.httpWaiting.dec();
  }
}
