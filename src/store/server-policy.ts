/** Run-time server rules (admin API, CLI) and the policy every worker keeps fresh. */
import type { Logger } from "pino";
import type { Limit, RateLimits } from "../policy/rate-limit.ts";
import { mergePolicies, type PolicyMode, type RuleAction, type ServerPolicy } from "../policy/server-rules.ts";
import type { Db } from "./db.ts";

export interface RuntimePolicy {
  readonly mode: PolicyMode | undefined;
  readonly rules: readonly { readonly pattern: string; readonly action: RuleAction }[];
}

export async function loadRuntimePolicy(db: Db): Promise<RuntimePolicy> {
  const [rules, mode] = await Promise.all([
    db.kysely.selectFrom("server_rules").select(["pattern", "action"]).orderBy("pattern").execute(),
    db.kysely.selectFrom("server_policy").select("mode").executeTakeFirst(),
  ]);
  return { mode: mode?.mode, rules };
}

export async function putRule(db: Db, pattern: string, action: RuleAction): Promise<void> {
  await db.kysely.insertInto("server_rules").values({ pattern, action })
    .onConflict((oc) => oc.column("pattern").doUpdateSet({ action })).execute();
}

export async function deleteRule(db: Db, pattern: string): Promise<boolean> {
  return (await db.kysely.deleteFrom("server_rules").where("pattern", "=", pattern).executeTakeFirst()).numDeletedRows > 0n;
}

export type OverrideScope = "server" | "client";

export async function putRateOverride(db: Db, scope: OverrideScope, subject: string, limit: Limit): Promise<void> {
  await db.kysely.insertInto("rate_overrides").values({ scope, subject, rate: limit.rate, burst: limit.burst })
    .onConflict((oc) => oc.columns(["scope", "subject"]).doUpdateSet({ rate: limit.rate, burst: limit.burst, updated_at: new Date() })).execute();
}

export async function deleteRateOverride(db: Db, scope: OverrideScope, subject: string): Promise<boolean> {
  const r = await db.kysely.deleteFrom("rate_overrides").where("scope", "=", scope).where("subject", "=", subject).executeTakeFirst();
  return r.numDeletedRows > 0n;
}

export async function loadRateOverrides(db: Db): Promise<{ servers: Record<string, Limit>; clients: Record<string, Limit> }> {
  const rows = await db.kysely.selectFrom("rate_overrides").select(["scope", "subject", "rate", "burst"]).orderBy("subject").execute();
  const pick = (scope: OverrideScope) => Object.fromEntries(rows.filter((r) => r.scope === scope).map((r) => [r.subject, { rate: r.rate, burst: r.burst }]));
  return { servers: pick("server"), clients: pick("client") };
}

/** Configured limits with run-time overrides on top. */
export function mergeRateLimits(configured: RateLimits, overrides: { servers: Record<string, Limit>; clients: Record<string, Limit> }): RateLimits {
  return { ...configured, servers: { ...configured.servers, ...overrides.servers }, clients: { ...configured.clients, ...overrides.clients } };
}

export async function setMode(db: Db, mode: PolicyMode): Promise<void> {
  await db.kysely.insertInto("server_policy").values({ mode })
    .onConflict((oc) => oc.column("singleton").doUpdateSet({ mode, updated_at: new Date() })).execute();
}

export interface PolicyWatcher {
  current(): ServerPolicy;
  rates(): RateLimits;
  /** Reloads now (the API calls it after a change, so its own process sees it at once). */
  refresh(): Promise<void>;
  close(): void;
}

/**
 * Every process re-reads the (small) rule and override tables every
 * `intervalMs`, so a change made through any process applies everywhere within
 * that bound. A failed read keeps the last known state: Postgres being down
 * must not open the gates.
 */
export async function watchServerPolicy(
  db: Db,
  configured: { policy: ServerPolicy; rateLimits: RateLimits },
  intervalMs: number,
  log?: Logger,
): Promise<PolicyWatcher> {
  const load = async (): Promise<[ServerPolicy, RateLimits]> => {
    const [runtime, overrides] = await Promise.all([loadRuntimePolicy(db), loadRateOverrides(db)]);
    return [mergePolicies(configured.policy, runtime), mergeRateLimits(configured.rateLimits, overrides)];
  };
  let [policy, rates] = await load();
  const refresh = async (): Promise<void> => {
    try {
      [policy, rates] = await load();
    } catch (err) {
      log?.warn({ err: (err as Error).message }, "policy refresh failed; keeping the last known rules");
    }
  };
  const timer = setInterval(() => void refresh(), intervalMs);
  timer.unref();
  return { current: () => policy, rates: () => rates, refresh, close: () => clearInterval(timer) };
}
