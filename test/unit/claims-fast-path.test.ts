/**
 * wellFormedClaims is eventClaimsSchema in one pass (verifyEvent uses it first,
 * and the schema only to explain a refusal). Property: on any payload, the two
 * agree — the one-pass check accepts exactly what the schema accepts, and
 * returns what the schema's parse returns. Payloads are valid claims with edits
 * aimed at every rule: each member replaced by values of every JSON type and at
 * the bounds of its length or range, removed, or joined by unknown members; and
 * the same for recipients, including duplicate ids.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { eventClaimsSchema, MAX_CAPABILITY_LENGTH, MAX_CTYPE_LENGTH, MAX_RECIPIENTS, wellFormedClaims } from "../../src/protocol/claims.ts";

const VALID = {
  iss: "alpha.example", aud: "beta.example", jti: "e-1", iat: 1_750_000_000, exp: 1_750_003_600,
  grp: "room@alpha.example", rcpt: [{ cid: "c1", cap: "x".repeat(43) }, { cid: "c2" }], body: "aGk",
};

const text = (n: number, ch = "a"): string => ch.repeat(n);

/** Values near every rule's edge, of every JSON type. */
const valueArb: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(
    null, true, false, 0, -1, 1.5, 2 ** 40, 2 ** 40 + 1, Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER + 1, -0, 1e300,
    "", "a", "ab", "abc", "alpha.example", "Alpha.example", "-alpha", "a_b", "e-1", "e 1", "room@alpha.example", "@alpha.example",
    text(64), text(65), text(253), text(254), text(255), text(256), text(257), text(382), text(383),
    text(MAX_CAPABILITY_LENGTH), text(MAX_CAPABILITY_LENGTH + 1), text(MAX_CTYPE_LENGTH), text(MAX_CTYPE_LENGTH + 1),
    "c1", "c:1/@x", "c\u0000", "\u00e9", [], {}, [1], { cid: "c1" },
  ),
  fc.string({ maxLength: 20 }),
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
  fc.json().map((j) => JSON.parse(j) as unknown),
);

const MEMBERS = ["iss", "aud", "jti", "iat", "exp", "grp", "rcpt", "body", "ctype", "seq", "extra", "__proto__"] as const;

const recipientEditArb = fc.oneof(
  fc.record({ op: fc.constant("set" as const), index: fc.nat(3), name: fc.constantFrom("cid", "cap", "other"), value: valueArb }),
  fc.record({ op: fc.constant("drop" as const), index: fc.nat(3), name: fc.constantFrom("cid", "cap") }),
  fc.record({ op: fc.constant("replace" as const), index: fc.nat(3), value: valueArb }),
  fc.record({ op: fc.constant("duplicate" as const), index: fc.nat(3) }),
  fc.record({ op: fc.constant("count" as const), n: fc.constantFrom(0, 1, MAX_RECIPIENTS, MAX_RECIPIENTS + 1) }),
);

const editArb = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant("member" as const), name: fc.constantFrom(...MEMBERS), value: valueArb }) },
  fc.record({ kind: fc.constant("remove" as const), name: fc.constantFrom(...MEMBERS) }),
  { weight: 3, arbitrary: fc.record({ kind: fc.constant("recipient" as const), edit: recipientEditArb }) },
);

function apply(edits: readonly unknown[]): Record<string, unknown> {
  // JSON round trip: payloads come from JSON.parse, so "__proto__" is an own member.
  const payload = JSON.parse(JSON.stringify(VALID)) as Record<string, unknown>;
  for (const e of edits as { kind: string; name?: string; value?: unknown; edit?: Record<string, unknown> }[]) {
    if (e.kind === "member") Object.defineProperty(payload, e.name!, { value: e.value, enumerable: true, writable: true, configurable: true });
    else if (e.kind === "remove") delete payload[e.name!];
    else if (Array.isArray(payload.rcpt)) {
      const list = payload.rcpt as unknown[];
      const r = e.edit! as { op: string; index: number; name?: string; value?: unknown; n?: number };
      const at = Math.min(r.index, Math.max(0, list.length - 1));
      if (r.op === "count") payload.rcpt = Array.from({ length: r.n! }, (_, i) => ({ cid: `c${i}` }));
      else if (r.op === "duplicate" && list.length > 0) list.push(structuredClone(list[at]));
      else if (r.op === "replace") list[at] = r.value;
      else if (list[at] !== null && typeof list[at] === "object" && !Array.isArray(list[at])) {
        const target = list[at] as Record<string, unknown>;
        if (r.op === "set") target[r.name!] = r.value;
        else delete target[r.name!];
      }
    }
  }
  return JSON.parse(JSON.stringify(payload)) as Record<string, unknown>;
}

describe("wellFormedClaims", () => {
  it("accepts the valid claims, as the schema returns them", () => {
    expect(wellFormedClaims(structuredClone(VALID))).toStrictEqual(eventClaimsSchema.parse(structuredClone(VALID)));
  });

  it("agrees with eventClaimsSchema on every edited payload", () => {
    let accepted = 0;
    fc.assert(
      fc.property(fc.array(editArb, { minLength: 1, maxLength: 4 }), (edits) => {
        const payload = apply(edits);
        const fast = wellFormedClaims(payload);
        const parsed = eventClaimsSchema.safeParse(payload);
        expect(fast !== undefined).toBe(parsed.success);
        if (parsed.success) {
          accepted += 1;
          expect(fast).toStrictEqual(parsed.data);
        }
      }),
      { numRuns: 4000 },
    );
    // Both answers occur often enough for the agreement to mean something.
    expect(accepted).toBeGreaterThan(200);
    expect(accepted).toBeLessThan(3800);
  });
});
