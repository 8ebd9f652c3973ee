/**
 * The batch planner (src/receive/plan.ts) without Postgres: what it decides
 * from what a transaction read.
 */
import { describe, expect, it } from "vitest";
import type { RateLimits } from "../../src/policy/rate-limit.ts";
import type { VerifiedEvent } from "../../src/protocol/verify.ts";
import { planBatch, type DecisionInputs, type LockedClient, type PlanInputs, type PlanResult } from "../../src/receive/plan.ts";
import type { AcceptedInput } from "../../src/receive/types.ts";

const NOW = 1_750_000_000;
const LIMITS: RateLimits = {
  enabled: true,
  client: { rate: 1, burst: 3 },
  senderClient: { rate: 1, burst: 2 },
  sender: { rate: 10, burst: 1000 },
  servers: {}, clients: {}, maxDelaySeconds: 300,
};

let seq = 0;
function event(iss: string, jti: string, rcpt: { cid: string; cap?: string }[], publishedAt = NOW): AcceptedInput {
  const claims = { iss, aud: "beta", jti, iat: NOW, exp: NOW + 60, grp: `g@${iss}`, rcpt };
  return { streamSeq: ++seq, event: { claims, bytes: new Uint8Array(), key: { thumbprint: "t" } } as unknown as VerifiedEvent, publishedAt };
}

/** Clients with a capability each for g@alpha, as statement 2 reads them. */
function read(clients: Record<string, { cursor: number; buckets?: LockedClient["buckets"] }>, senders: DecisionInputs["senders"] = new Map()): DecisionInputs {
  return {
    clients: new Map(Object.entries(clients).map(([id, c]) => [id, { id, cursor: c.cursor, buckets: c.buckets ?? {} }])),
    capabilities: new Map(Object.keys(clients).map((id) => [`cap-${id}`, { clientId: id, grp: "g@alpha", owner: "alpha", revoked: false }])),
    blocks: new Map(),
    senders,
  };
}

const rcpt = (...ids: string[]) => ids.map((cid) => ({ cid, cap: `cap-${cid}` }));

function plan(result: PlanResult) {
  if (result.kind !== "plan") throw new Error(`asked to lock ${result.keys.join(", ")}`);
  return result.plan;
}

describe("planBatch", () => {
  it("gives each client's deliveries the next cursors in batch order, refuses what policy refuses, and reports duplicates", () => {
    const e1 = event("alpha", "e1", rcpt("c1", "c2"));
    const e2 = event("alpha", "e2", [...rcpt("c1"), { cid: "ghost", cap: "cap-ghost" }, { cid: "c2" }]);
    const dup = event("alpha", "e0", rcpt("c1"));
    const inputs: PlanInputs = { accepted: [e1, dup, e2], stored: [e1, e2], read: read({ c1: { cursor: 5 }, c2: { cursor: 0 } }), limits: undefined, now: NOW };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    expect(p.deliveries).toEqual({ client: ["c1", "c2", "c1"], seq: [6, 1, 7], iss: ["alpha", "alpha", "alpha"], jti: ["e1", "e1", "e2"] });
    expect(p.refusals).toEqual({ client: ["ghost", "c2"], reason: ["capability_mismatch", "no_capability"], iss: ["alpha", "alpha"], jti: ["e2", "e2"] });
    expect(p.clients).toEqual([["c1", [7]], ["c2", [1]]]);
    expect(p.outcomes.map((o) => o.status)).toEqual(["stored", "duplicate", "stored"]);
    expect(p.senderCharges).toEqual([]);
  });

  it("charges a client's buckets in its stored form, dropping those full again, and leaves the sender's charge to the last statement", () => {
    const e1 = event("alpha", "e1", rcpt("c1"));
    // c1's all-senders bucket at 1 token, its bucket for gamma long refilled.
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: { cursor: 0, buckets: { "*": [1, NOW], gamma: [0, NOW - 3600] } } }), limits: LIMITS, now: NOW };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    expect(p.clients).toEqual([["c1", [1, { "*": [0, NOW], alpha: [1, NOW] }]]]);
    expect(p.senderCharges).toEqual([{ key: "s:alpha", limit: LIMITS.sender, charged: 1, needed: 1 }]);
    expect(p.senderBuckets.size).toBe(0);
  });

  it("refuses a recipient rate_limited when its bucket is empty, charging nothing for it", () => {
    const e1 = event("alpha", "e1", rcpt("c1", "c2"));
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: { cursor: 0, buckets: { "*": [0, NOW] } }, c2: { cursor: 0 } }), limits: LIMITS, now: NOW };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    expect(p.deliveries.client).toEqual(["c2"]);
    expect(p.refusals).toMatchObject({ client: ["c1"], reason: ["rate_limited"] });
    expect(p.senderCharges).toEqual([{ key: "s:alpha", limit: LIMITS.sender, charged: 1, needed: 2 }]);
  });

  it("asks for the senders' buckets under a lock when one is short of the batch, or when told to lock first; then charges them exactly", () => {
    const e1 = event("alpha", "e1", rcpt("c1"));
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: { cursor: 0 } }, new Map([["s:alpha", { tokens: 0.5, updatedAt: NOW }]])), limits: LIMITS, now: NOW };
    expect(planBatch(inputs, { lockFirst: false })).toEqual({ kind: "lock senders", keys: ["s:alpha"] });
    const roomy: PlanInputs = { ...inputs, read: read({ c1: { cursor: 0 } }) };
    expect(planBatch(roomy, { lockFirst: true })).toEqual({ kind: "lock senders", keys: ["s:alpha"] });
    const p = plan(planBatch(inputs, { lockFirst: false, lockedSenders: new Map([["s:alpha", { tokens: 500, updatedAt: NOW }]]) }));
    expect(p.senderCharges).toEqual([]);
    expect([...p.senderBuckets]).toEqual([["s:alpha", { tokens: 499, updatedAt: NOW }]]);
    expect(p.deliveries.client).toEqual(["c1"]);
  });

  it("delays an event its sender's bucket cannot cover, taking it back, until it has waited maxDelaySeconds; then refuses its recipients rate_limited", () => {
    const fresh = event("alpha", "e1", rcpt("c1"), NOW - 10);
    const locked = new Map([["s:alpha", { tokens: 0, updatedAt: NOW }]]);
    const p = plan(planBatch({ accepted: [fresh], stored: [fresh], read: read({ c1: { cursor: 0 } }), limits: LIMITS, now: NOW }, { lockFirst: false, lockedSenders: locked }));
    expect(p.outcomes).toEqual([{ streamSeq: fresh.streamSeq, status: "delayed", waitSeconds: 0.1 }]);
    expect(p.takenBack).toEqual([fresh]);
    expect(p.deliveries.client).toEqual([]);
    const old = event("alpha", "e2", rcpt("c1"), NOW - 301);
    const q = plan(planBatch({ accepted: [old], stored: [old], read: read({ c1: { cursor: 0 } }), limits: LIMITS, now: NOW }, { lockFirst: false, lockedSenders: locked }));
    expect(q.outcomes).toEqual([{ streamSeq: old.streamSeq, status: "stored", decision: { accepted: [], refused: [{ cid: "c1", reason: "rate_limited" }] } }]);
    expect(q.takenBack).toEqual([]);
    expect(q.records.refused).toEqual(['[["c1","rate_limited"]]']);
  });

  it("charges nothing, and asks for no lock, when no recipient is accepted", () => {
    const e1 = event("alpha", "e1", [{ cid: "ghost" }]);
    const p = plan(planBatch({ accepted: [e1], stored: [e1], read: read({}), limits: LIMITS, now: NOW }, { lockFirst: true }));
    expect(p.senderCharges).toEqual([]);
    expect(p.records).toEqual({ iss: ["alpha"], jti: ["e1"], refused: ['[["ghost","no_capability"]]'] });
  });

  it("keeps an event nobody receives as a record of its refusals in recipient order, with no refusal rows, and keeps the rows of one that delivers", () => {
    // Refused for three reasons, one of them a rate limit (decided after policy): recipient order all the same.
    const none = event("alpha", "none", [{ cid: "ghost", cap: "cap-ghost" }, ...rcpt("c1"), { cid: "c2" }]);
    const some = event("alpha", "some", [{ cid: "ghost", cap: "cap-ghost" }, ...rcpt("c2")]);
    const dup = event("alpha", "dup", [{ cid: "ghost" }]);
    const inputs: PlanInputs = {
      accepted: [none, some, dup], stored: [none, some], limits: LIMITS, now: NOW,
      read: read({ c1: { cursor: 0, buckets: { "*": [0, NOW] } }, c2: { cursor: 4 } }),
    };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    expect(p.records).toEqual({ iss: ["alpha"], jti: ["none"], refused: ['[["ghost","capability_mismatch"],["c1","rate_limited"],["c2","no_capability"]]'] });
    expect(p.refusals).toEqual({ client: ["ghost"], reason: ["capability_mismatch"], iss: ["alpha"], jti: ["some"] });
    expect(p.deliveries).toEqual({ client: ["c2"], seq: [5], iss: ["alpha"], jti: ["some"] });
    // Both are reported; the duplicate is neither a record nor rows again.
    expect(p.reported.jti).toEqual(["none", "some", "dup"]);
    expect(p.outcomes.map((o) => o.status)).toEqual(["stored", "stored", "duplicate"]);
  });

  it("keeps no record of an event it delays: it is taken back, and decided when it comes again", () => {
    const fresh = event("alpha", "e1", rcpt("c1"), NOW - 10);
    const p = plan(planBatch({ accepted: [fresh], stored: [fresh], read: read({ c1: { cursor: 0 } }), limits: LIMITS, now: NOW },
      { lockFirst: false, lockedSenders: new Map([["s:alpha", { tokens: 0, updatedAt: NOW }]]) }));
    expect(p.takenBack).toEqual([fresh]);
    expect(p.records.jti).toEqual([]);
  });
});
