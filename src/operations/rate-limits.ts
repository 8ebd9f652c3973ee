/** Run-time rate-limit overrides: a trusted peer's sender limit, a bot client's own limit. */
import { RelayError } from "../errors.ts";
import { MAX_LIMIT, type Limit, type RateLimits } from "../policy/rate-limit.ts";
import { MAX_RECIPIENTS } from "../protocol/claims.ts";
import { isHomeserverName } from "../protocol/names.ts";
import { deleteRateOverride, loadRateOverrides, putRateOverride, type OverrideScope } from "../store/server-policy.ts";
import { clientId, oneOf, type Operation } from "./operation.ts";

const OVERRIDE_SCOPES: readonly OverrideScope[] = ["server", "client"];

export type RateOverrides = Pick<RateLimits, "servers" | "clients">;
/** `{ server: name, rate, burst }` or `{ client: id, rate, burst }`. */
export type RateOverride = Partial<Record<OverrideScope, string>> & Limit;

function overrideTarget(scope: string | undefined, subject: string | undefined): { scope: OverrideScope; subject: string } {
  const checked = oneOf(OVERRIDE_SCOPES, scope, "rate limit scope");
  if (checked === "client") return { scope: checked, subject: clientId(subject) };
  if (!isHomeserverName(subject)) throw new RelayError("bad_request", `${JSON.stringify(subject ?? "")} is not a homeserver name`);
  return { scope: checked, subject };
}

function checkedLimit(scope: OverrideScope, { rate, burst }: Limit): Limit {
  if (!(rate >= 0)) throw new RelayError("bad_request", "rate limit rate: must be at least 0");
  // A sender's bucket must hold a whole event (DESIGN §5: up to 1,000 recipients).
  if (scope === "server" && !(burst >= MAX_RECIPIENTS)) throw new RelayError("bad_request", `rate limit burst: must be at least ${MAX_RECIPIENTS} for a homeserver`);
  if (!(burst >= 1)) throw new RelayError("bad_request", "rate limit burst: must be at least 1");
  if (rate > MAX_LIMIT || burst > MAX_LIMIT) throw new RelayError("bad_request", `rate limit rate and burst: must be at most ${MAX_LIMIT} (1e12)`);
  return { rate, burst };
}

/** The limits in force, then the run-time overrides; what is in force comes from the caller, as for showPolicy. */
export function showRateLimits(inForce: (runtime: RateOverrides) => RateLimits): Operation<RateLimits & { runtime: RateOverrides }> {
  return async (db) => {
    const runtime = await loadRateOverrides(db);
    return { ...inForce(runtime), runtime };
  };
}

export function putRateLimit(scope: string | undefined, subject: string | undefined, limit: Limit): Operation<RateOverride> {
  const target = overrideTarget(scope, subject);
  const checked = checkedLimit(target.scope, limit);
  return async (db) => {
    await putRateOverride(db, target.scope, target.subject, checked);
    return { [target.scope]: target.subject, ...checked };
  };
}

/** Only a run-time override goes: a configured one stays until the configuration changes. */
export function removeRateLimit(scope: string | undefined, subject: string | undefined): Operation<void> {
  const target = overrideTarget(scope, subject);
  return async (db) => {
    if (!(await deleteRateOverride(db, target.scope, target.subject))) throw new RelayError("not_found", `no run-time limit for ${target.subject}`);
  };
}
