import { describe, expect, it } from "vitest";
import type { RecipientReason } from "../../src/errors.ts";
import { decideRecipient, decideRecipients, type CapabilityBinding, type RecipientFacts } from "../../src/policy/recipients.ts";
import { isSenderAllowed, isServerPattern, matchesPattern, mergePolicies, type ServerPolicy } from "../../src/policy/server-rules.ts";
import type { EventClaims } from "../../src/protocol/claims.ts";

const EVENT = { iss: "alpha", grp: "climbing@alpha" };
const GOOD: CapabilityBinding = { clientId: "bob", grp: "climbing@alpha", owner: "alpha", revoked: false };

function facts(over: { caps?: Record<string, CapabilityBinding>; clients?: string[]; servers?: string[]; groups?: string[] } = {}): RecipientFacts {
  return {
    knownClients: new Set(over.clients ?? ["bob"]),
    capabilities: new Map(Object.entries(over.caps ?? { "cap-bob": GOOD })),
    blocks: new Map([["bob", { servers: new Set(over.servers ?? []), groups: new Set(over.groups ?? []) }]]),
  };
}

describe("one recipient, in the protocol's order", () => {
  const cases: [string, { cid: string; cap?: string }, RecipientFacts, RecipientReason | undefined][] = [
    ["a bound, live capability for a known, unblocking client is accepted", { cid: "bob", cap: "cap-bob" }, facts(), undefined],
    ["no capability is no_capability", { cid: "bob" }, facts(), "no_capability"],
    ["an unknown capability is capability_mismatch", { cid: "bob", cap: "guess" }, facts(), "capability_mismatch"],
    ["a capability issued to another client is capability_mismatch", { cid: "bart", cap: "cap-bob" }, facts({ clients: ["bob", "bart"] }), "capability_mismatch"],
    ["a capability for another group is capability_mismatch", { cid: "bob", cap: "c" }, facts({ caps: { c: { ...GOOD, grp: "other@alpha" } } }), "capability_mismatch"],
    ["a capability for another owner is capability_mismatch", { cid: "bob", cap: "c" }, facts({ caps: { c: { ...GOOD, owner: "gamma" } } }), "capability_mismatch"],
    ["a revoked capability is capability_revoked", { cid: "bob", cap: "c" }, facts({ caps: { c: { ...GOOD, revoked: true } } }), "capability_revoked"],
    ["a revoked capability for another client is still capability_mismatch", { cid: "bart", cap: "c" }, facts({ caps: { c: { ...GOOD, revoked: true } } }), "capability_mismatch"],
    ["a client that no longer exists is unknown_client", { cid: "bob", cap: "cap-bob" }, facts({ clients: [] }), "unknown_client"],
    ["a client blocking the sender is blocked_by_client", { cid: "bob", cap: "cap-bob" }, facts({ servers: ["alpha"] }), "blocked_by_client"],
    ["a client blocking the group is blocked_by_client", { cid: "bob", cap: "cap-bob" }, facts({ groups: ["climbing@alpha"] }), "blocked_by_client"],
    ["a block of another server or group does not matter", { cid: "bob", cap: "cap-bob" }, facts({ servers: ["gamma"], groups: ["x@alpha"] }), undefined],
    ["without a capability, a missing client is not revealed (no_capability first)", { cid: "ghost" }, facts({ clients: [] }), "no_capability"],
    ["a guessed capability for a missing client is capability_mismatch, not unknown_client", { cid: "ghost", cap: "guess" }, facts({ clients: [] }), "capability_mismatch"],
  ];
  for (const [name, recipient, f, expected] of cases) {
    it(name, () => expect(decideRecipient(EVENT, recipient, f)).toBe(expected));
  }
});

describe("a whole event", () => {
  it("accepts some recipients and refuses others, each with its reason, in rcpt order", () => {
    const claims = { ...EVENT, aud: "beta", jti: "j", iat: 0, exp: 1, body: "", rcpt: [
      { cid: "bob", cap: "cap-bob" }, { cid: "mallory" }, { cid: "bart", cap: "cap-bart" },
    ] } as EventClaims;
    const f = facts({ clients: ["bob", "bart"], caps: { "cap-bob": GOOD, "cap-bart": { ...GOOD, clientId: "bart", revoked: true } } });
    expect(decideRecipients(claims, f)).toEqual({
      accepted: ["bob"],
      refused: [{ cid: "mallory", reason: "no_capability" }, { cid: "bart", reason: "capability_revoked" }],
    });
  });
});

describe("server-level policy", () => {
  const policy = (p: Partial<ServerPolicy>): ServerPolicy => ({ mode: "open", allow: [], deny: [], ...p });
  it("open mode allows every homeserver not denied", () => {
    expect(isSenderAllowed("alpha", policy({}))).toBe(true);
    expect(isSenderAllowed("alpha", policy({ deny: ["alpha"] }))).toBe(false);
  });
  it("allow-list mode allows only listed homeservers", () => {
    const p = policy({ mode: "allowlist", allow: ["alpha", "*.example.org"] });
    expect(isSenderAllowed("alpha", p)).toBe(true);
    expect(isSenderAllowed("chat.example.org", p)).toBe(true);
    expect(isSenderAllowed("a.b.example.org", p)).toBe(true);
    expect(isSenderAllowed("example.org", p)).toBe(false);
    expect(isSenderAllowed("badexample.org", p)).toBe(false);
    expect(isSenderAllowed("gamma", p)).toBe(false);
  });
  it("deny wins over allow, so a wildcard allow can have exceptions", () => {
    const p = policy({ mode: "allowlist", allow: ["*.example.org"], deny: ["spam.example.org"] });
    expect(isSenderAllowed("spam.example.org", p)).toBe(false);
    expect(isSenderAllowed("chat.example.org", p)).toBe(true);
  });
  it("patterns are exact names or *.suffix, nothing else", () => {
    for (const ok of ["alpha", "a.example.org", "*.example.org", "*.org"]) expect(isServerPattern(ok)).toBe(true);
    for (const bad of ["*", "*.", "a.*.org", "Alpha", "*example.org", "a..b", "", "**.org"]) expect(isServerPattern(bad)).toBe(false);
    expect(matchesPattern("x.example.org", "*.example.org")).toBe(true);
    expect(matchesPattern("example.org", "*.example.org")).toBe(false);
  });
  it("run-time rules add to the configured ones and a run-time mode overrides the configured one", () => {
    const merged = mergePolicies(policy({ allow: ["alpha"], deny: ["spam"] }), { mode: "allowlist", rules: [{ pattern: "beta", action: "allow" }, { pattern: "*.bad", action: "deny" }] });
    expect(merged).toEqual({ mode: "allowlist", allow: ["alpha", "beta"], deny: ["spam", "*.bad"] });
    expect(mergePolicies(policy({ mode: "allowlist" }), { rules: [] }).mode).toBe("allowlist");
  });
});
