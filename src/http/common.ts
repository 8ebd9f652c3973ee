/** Shared by the route modules: request parsing and the two kinds of caller. */
import type { FastifyRequest } from "fastify";
import type { z } from "zod";
import { RelayError } from "../errors.ts";
import type { FanoutRequest, FanoutResult } from "../fanout.ts";
import { clientExists } from "../store/clients.ts";
import type { Db } from "../store/db.ts";
import type { DeliveryNotifier } from "../store/notifier.ts";
import type { PolicyWatcher } from "../store/server-policy.ts";
import { checkServiceToken, type ClientTokens } from "./auth.ts";

export interface ApiDeps {
  readonly self: string;
  readonly db: Db;
  readonly notifier: DeliveryNotifier;
  readonly fanout: { fanout(request: FanoutRequest): Promise<FanoutResult> };
  readonly clientTokens: ClientTokens;
  readonly policy: PolicyWatcher;
  readonly jwks: () => { keys: readonly object[] };
  readonly serviceToken: string | undefined;
  readonly maxWaitSeconds: number;
  /** Request bodies: a fan-out carries one body plus its recipient list. */
  readonly bodyLimit: number;
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

export async function requireService(api: ApiDeps, request: FastifyRequest): Promise<void> {
  checkServiceToken(request.headers.authorization, api.serviceToken);
}

/** The calling client's id; a token for a client that was removed is refused. */
export async function requireClient(api: ApiDeps, request: FastifyRequest): Promise<string> {
  const id = await api.clientTokens.verify(request.headers.authorization);
  if (!(await clientExists(api.db, id))) throw new RelayError("unauthorized", `client ${id} no longer exists`);
  return id;
}

/**
 * Waits up to `seconds` for `check` to return something, waking on any of
 * the notifier's `keys`. The waiter is registered before each check, so a commit
 * between the check and the wait still wakes it.
 */
export async function longPoll<T>(api: ApiDeps, keys: readonly string[], seconds: number, check: () => Promise<T | undefined>): Promise<T | undefined> {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const remaining = deadline - Date.now();
    const waiters = remaining > 0 ? keys.map((key) => api.notifier.waiter(key, remaining)) : [];
    const value = await check();
    if (value !== undefined || waiters.length === 0) {
      for (const w of waiters) w.cancel();
      return value;
    }
    await Promise.race(waiters.map((w) => w.promise));
    for (const w of waiters) w.cancel();
    // Shutting down: one last look, then answer.
    if (api.notifier.closed) return check();
  }
}
