/** Run-time server rules (admin API, CLI) and the policy every worker keeps fresh. */
import type { Logger } from "pino";
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

export async function setMode(db: Db, mode: PolicyMode): Promise<void> {
  await db.kysely.insertInto("server_policy").values({ mode })
    .onConflict((oc) => oc.column("singleton").doUpdateSet({ mode, updated_at: new Date() })).execute();
}

export interface PolicyWatcher {
  current(): ServerPolicy;
  /** Reloads now (the API calls it after a change, so its own process sees it at once). */
  refresh(): Promise<void>;
  close(): void;
}

/**
 * Every process re-reads the (small) rule tables every `intervalMs`, so a change
 * made through any process applies everywhere within that bound. A failed read
 * keeps the last known policy: Postgres being down must not open the gates.
 */
export async function watchServerPolicy(db: Db, configured: ServerPolicy, intervalMs: number, log?: Logger): Promise<PolicyWatcher> {
  let policy = mergePolicies(configured, await loadRuntimePolicy(db));
  const refresh = async (): Promise<void> => {
    try {
      policy = mergePolicies(configured, await loadRuntimePolicy(db));
    } catch (err) {
      log?.warn({ err: (err as Error).message }, "policy refresh failed; keeping the last known rules");
    }
  };
  const timer = setInterval(() => void refresh(), intervalMs);
  timer.unref();
  return { current: () => policy, refresh, close: () => clearInterval(timer) };
}
