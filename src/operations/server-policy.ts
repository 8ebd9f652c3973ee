/** The server-level policy's run-time part (DESIGN §2): allow and deny rules, and the mode. */
import { RelayError } from "../errors.ts";
import { isServerPattern, type PolicyMode, type RuleAction, type ServerPolicy } from "../policy/server-rules.ts";
import { deleteRule, loadRuntimePolicy, putRule, setMode, type RuntimePolicy } from "../store/server-policy.ts";
import { oneOf, type Operation } from "./operation.ts";

const RULE_ACTIONS: readonly RuleAction[] = ["allow", "deny"];
const POLICY_MODES: readonly PolicyMode[] = ["open", "allowlist"];

export interface ServerRule {
  readonly pattern: string;
  readonly action: RuleAction;
}

function serverPattern(value: string | undefined): string {
  if (!isServerPattern(value)) throw new RelayError("bad_request", `${JSON.stringify(value ?? "")} is not a homeserver name or *.suffix pattern`);
  return value;
}

/**
 * The policy in force, then its run-time part. The caller knows what is in
 * force: an API process from its own watcher, the CLI by merging the
 * configured policy with the run-time part.
 */
export function showPolicy<T extends ServerPolicy>(inForce: (runtime: RuntimePolicy) => T): Operation<T & { runtime: RuntimePolicy }> {
  return async (db) => {
    const runtime = await loadRuntimePolicy(db);
    return { ...inForce(runtime), runtime };
  };
}

export function putServerRule(pattern: string | undefined, action: string | undefined): Operation<ServerRule> {
  const rule = { pattern: serverPattern(pattern), action: oneOf(RULE_ACTIONS, action, "rule action") };
  return async (db) => {
    await putRule(db, rule.pattern, rule.action);
    return rule;
  };
}

/** Only run-time rules go: a configured one stays until the configuration changes. */
export function removeServerRule(pattern: string | undefined): Operation<void> {
  const checked = serverPattern(pattern);
  return async (db) => {
    if (!(await deleteRule(db, checked))) throw new RelayError("not_found", `no run-time rule ${checked}`);
  };
}

export function setPolicyMode(mode: string | undefined): Operation<{ mode: PolicyMode }> {
  const checked = oneOf(POLICY_MODES, mode, "policy mode");
  return async (db) => {
    await setMode(db, checked);
    return { mode: checked };
  };
}
