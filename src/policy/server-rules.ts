/**
 * Server-level recipient policy (DESIGN §2, §5 step 2): which homeservers may
 * deliver here. Pure: the rules are data, merged from config and the admin API.
 */

export type PolicyMode = "open" | "allowlist";
export type RuleAction = "allow" | "deny";

export interface ServerPolicy {
  /** `open`: every federated homeserver not denied; `allowlist`: only those allowed and not denied. */
  readonly mode: PolicyMode;
  readonly allow: readonly string[];
  readonly deny: readonly string[];
}

export const OPEN_POLICY: ServerPolicy = Object.freeze({ mode: "open", allow: [], deny: [] });

const LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
const PATTERN_RE = new RegExp(`^(?:\\*\\.)?${LABEL}(?:\\.${LABEL})*$`);

/** An exact homeserver name, or `*.example.org` for every name under example.org (not example.org itself). */
export function isServerPattern(value: unknown): value is string {
  return typeof value === "string" && value.length <= 255 && PATTERN_RE.test(value);
}

export function matchesPattern(homeserver: string, pattern: string): boolean {
  return pattern.startsWith("*.") ? homeserver.endsWith(pattern.slice(1)) : homeserver === pattern;
}

/** Deny wins over allow, so an operator can carve an exception out of a wildcard allow. */
export function isSenderAllowed(homeserver: string, policy: ServerPolicy): boolean {
  if (policy.deny.some((p) => matchesPattern(homeserver, p))) return false;
  return policy.mode === "open" || policy.allow.some((p) => matchesPattern(homeserver, p));
}

/** Config rules and runtime rules together; a runtime mode overrides the configured one. */
export function mergePolicies(config: ServerPolicy, runtime: { mode?: PolicyMode | undefined; rules: readonly { pattern: string; action: RuleAction }[] }): ServerPolicy {
  return {
    mode: runtime.mode ?? config.mode,
    allow: [...config.allow, ...runtime.rules.filter((r) => r.action === "allow").map((r) => r.pattern)],
    deny: [...config.deny, ...runtime.rules.filter((r) => r.action === "deny").map((r) => r.pattern)],
  };
}
