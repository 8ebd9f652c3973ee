/**
 * The operator actions the CLI and the backend API share (src/operations/)
 * check their input when they are made: a bad pattern, action, mode, scope,
 * name or limit is bad_request before any database is involved.
 */
import { describe, expect, it } from "vitest";
import { issueCapabilityFor, listCapabilitiesOf, revokeCapabilityFor } from "../../src/operations/capabilities.ts";
import { putRateLimit, removeRateLimit } from "../../src/operations/rate-limits.ts";
import { putServerRule, removeServerRule, setPolicyMode } from "../../src/operations/server-policy.ts";

const badRequest = (message: RegExp) => ({ name: "RelayError", code: "bad_request", message: expect.stringMatching(message) });

describe("server rules and mode", () => {
  it("a rule's pattern is a homeserver name or *.suffix, for putting and for removing", () => {
    for (const pattern of ["Not_A_Name", "*", "*.*.example.org", "a..b", "", undefined]) {
      expect(() => putServerRule(pattern, "deny")).toThrow(expect.objectContaining(badRequest(/is not a homeserver name or \*\.suffix pattern$/)));
      expect(() => removeServerRule(pattern)).toThrow(expect.objectContaining(badRequest(/is not a homeserver name or \*\.suffix pattern$/)));
    }
    for (const pattern of ["gamma", "chat.example.org", "*.example.org"]) {
      expect(putServerRule(pattern, "deny")).toBeTypeOf("function");
      expect(removeServerRule(pattern)).toBeTypeOf("function");
    }
  });

  it("a rule's action is allow or deny", () => {
    for (const action of ["block", "Allow", "", undefined]) {
      expect(() => putServerRule("gamma", action)).toThrow(expect.objectContaining(badRequest(/^rule action must be allow or deny, got "/)));
    }
  });

  it("the mode is open or allowlist", () => {
    for (const mode of ["closed", "OPEN", "", undefined]) {
      expect(() => setPolicyMode(mode)).toThrow(expect.objectContaining(badRequest(/^policy mode must be open or allowlist, got "/)));
    }
  });
});

describe("rate-limit overrides", () => {
  it("name a homeserver (scope server) or a client id (scope client), and nothing else", () => {
    const limit = { rate: 1, burst: 1000 };
    expect(() => putRateLimit("group", "beta", limit)).toThrow(expect.objectContaining(badRequest(/^rate limit scope must be server or client, got "group"$/)));
    expect(() => removeRateLimit(undefined, "beta")).toThrow(expect.objectContaining(badRequest(/^rate limit scope must be server or client/)));
    expect(() => putRateLimit("server", "Bad_Name", limit)).toThrow(expect.objectContaining(badRequest(/^"Bad_Name" is not a homeserver name$/)));
    expect(() => removeRateLimit("server", undefined)).toThrow(expect.objectContaining(badRequest(/^"" is not a homeserver name$/)));
    expect(() => putRateLimit("client", "bad id", limit)).toThrow(expect.objectContaining(badRequest(/^"bad id" is not a client id$/)));
    expect(() => removeRateLimit("client", "bad id")).toThrow(expect.objectContaining(badRequest(/is not a client id$/)));
  });

  it("a rate is 0 to 1e12 and a burst 1 to 1e12, and at least a whole event's 1,000 recipients for a homeserver", () => {
    for (const rate of [-1, Number.NaN]) {
      expect(() => putRateLimit("client", "bot", { rate, burst: 5 })).toThrow(expect.objectContaining(badRequest(/^rate limit rate: must be at least 0$/)));
    }
    for (const burst of [0, 0.5, Number.NaN]) {
      expect(() => putRateLimit("client", "bot", { rate: 1, burst })).toThrow(expect.objectContaining(badRequest(/^rate limit burst: must be at least 1$/)));
    }
    for (const burst of [1, 999, Number.NaN]) {
      expect(() => putRateLimit("server", "beta", { rate: 1, burst })).toThrow(expect.objectContaining(badRequest(/^rate limit burst: must be at least 1000 for a homeserver$/)));
    }
    // Postgres charges buckets in float8, which raises on overflow: no rate or burst past 1e12.
    for (const limit of [{ rate: Infinity, burst: 5 }, { rate: 1, burst: Infinity }, { rate: 1e300, burst: 1e300 }, { rate: 1e12 + 1, burst: 5 }]) {
      expect(() => putRateLimit("client", "bot", limit)).toThrow(expect.objectContaining(badRequest(/^rate limit rate and burst: must be at most 1000000000000 \(1e12\)$/)));
    }
    expect(putRateLimit("client", "bot", { rate: 1e12, burst: 1e12 })).toBeTypeOf("function");
    expect(putRateLimit("client", "bot", { rate: 0, burst: 1 })).toBeTypeOf("function");
    expect(putRateLimit("server", "beta", { rate: 0, burst: 1000 })).toBeTypeOf("function");
  });
});

describe("capabilities", () => {
  it("are issued for a client id and a group <local>@<owner>", () => {
    expect(() => issueCapabilityFor("bad id", "g@alpha")).toThrow(expect.objectContaining(badRequest(/^"bad id" is not a client id$/)));
    expect(() => issueCapabilityFor(undefined, "g@alpha")).toThrow(expect.objectContaining(badRequest(/^"" is not a client id$/)));
    for (const group of ["no-owner", "@alpha", "x@Alpha", "x y@alpha", undefined]) {
      expect(() => issueCapabilityFor("bob", group)).toThrow(expect.objectContaining(badRequest(/^capability group: must be <local>@<owner>, got "/)));
    }
  });

  it("are listed for a client id, and revoked by id, for a client id when one is named", () => {
    expect(() => listCapabilitiesOf("bad id")).toThrow(expect.objectContaining(badRequest(/is not a client id$/)));
    for (const id of ["", undefined]) {
      expect(() => revokeCapabilityFor(id)).toThrow(expect.objectContaining(badRequest(/^capability revoke needs a capability id$/)));
    }
    expect(() => revokeCapabilityFor("0190", "bad id")).toThrow(expect.objectContaining(badRequest(/is not a client id$/)));
  });
});
