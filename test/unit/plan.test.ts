/**
 * The batch planner (src/receive/plan.ts) without Postgres: what it decides
 * from what a transaction read.
 */
import { describe, expect, it } from "vitest";
import type { RateLimits } from "../../src/policy/rate-limit.ts";
import type { VerifiedEvent } from "../../src/protocol/verify.ts";
import { planBatch, type DecisionInputs, type LockedBuckets, type PlanInputs, type StoredBuckets, type PlanResult } from "../../src/receive/plan.ts";
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
function read(clients: Record<string, { buckets?: StoredBuckets }>, senders: DecisionInputs["senders"] = new Map()): DecisionInputs {
  return {
    clients: new Map(Object.entries(clients).map(([id, c]) => [id, { id, buckets: c.buckets ?? {}, createdAt: `t-${id}` }])),
    capabilities: new Map(Object.keys(clients).map((id) => [`cap-${id}`, { clientId: id, grp: "g@alpha", owner: "alpha", revoked: false }])),
    blocks: new Map(),
    senders,
  };
}

const rcpt = (...ids: string[]) => ids.map((cid) => ({ cid, cap: `cap-${cid}` }));

function plan(result: PlanResult) {
  if (result.kind !== "plan") throw new Error(`asked to lock ${[...result.clients, ...result.senders].join(", ")}`);
  return result.plan;
}

describe("planBatch", () => {
  it("numbers each client's deliveries in batch order (the cursor is added at commit), refuses what policy refuses, and reports duplicates", () => {
    const e1 = event("alpha", "e1", rcpt("c1", "c2"));
    const e2 = event("alpha", "e2", [...rcpt("c1"), { cid: "ghost", cap: "cap-ghost" }, { cid: "c2" }]);
    const dup = event("alpha", "e0", rcpt("c1"));
    const inputs: PlanInputs = { accepted: [e1, dup, e2], stored: [e1, e2], read: read({ c1: {}, c2: {} }), limits: undefined, now: NOW };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    expect(p.deliveries).toEqual({ client: ["c1", "c2", "c1"], ordinal: [1, 1, 2], iss: ["alpha", "alpha", "alpha"], jti: ["e1", "e1", "e2"] });
    expect(p.refusals).toEqual({ client: ["ghost", "c2"], reason: ["capability_mismatch", "no_capability"], iss: ["alpha", "alpha"], jti: ["e2", "e2"] });
    expect(p.clients).toEqual([["c1", [2, "t-c1"]], ["c2", [1, "t-c2"]]]);
    expect(p.clientsLocked).toBe(false);
    expect(p.outcomes.map((o) => o.status)).toEqual(["stored", "duplicate", "stored"]);
    expect(p.senderCharges).toEqual([]);
  });

  it("leaves every charge to the last statement's condition: each of a client's slots needs what its deliveries take, other senders' slots full again are dropped", () => {
    const e1 = event("alpha", "e1", rcpt("c1"));
    // c1's all-senders bucket at 1 token, its bucket for gamma long refilled.
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: { buckets: { "*": [1, NOW], gamma: [0, NOW - 3600] } } }), limits: LIMITS, now: NOW };
    const p = plan(planBatch(inputs, { lockFirst: false }));
    // [slot, rate, burst, charged, needed]: the client limit is 1/s burst 3, a sender's to it 1/s burst 2.
    expect(p.clients).toEqual([["c1", [1, "t-c1", [["*", 1, 3, 1, 1], ["alpha", 1, 2, 1, 1], ["gamma", 1, 2, 0, 0]]]]]);
    expect(p.senderCharges).toEqual([{ key: "s:alpha", limit: LIMITS.sender, charged: 1, needed: 1 }]);
    expect(p.senderBuckets.size).toBe(0);
  });

  it("asks for the buckets locked when a client's is empty as read, then refuses that recipient rate_limited, charging nothing for it and everything exactly", () => {
    const e1 = event("alpha", "e1", rcpt("c2", "c1"));
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: { buckets: { "*": [0, NOW] } }, c2: {} }), limits: LIMITS, now: NOW };
    expect(planBatch(inputs, { lockFirst: false })).toEqual({ kind: "lock", clients: ["c1", "c2"], senders: ["s:alpha"] });
    const locked: LockedBuckets = { clients: new Map<string, StoredBuckets>([["c1", { "*": [0, NOW] }], ["c2", {}]]), senders: new Map([["s:alpha", { tokens: 500, updatedAt: NOW }]]) };
    const p = plan(planBatch(inputs, { lockFirst: false, locked }));
    expect(p.deliveries.client).toEqual(["c2"]);
    expect(p.refusals).toMatchObject({ client: ["c1"], reason: ["rate_limited"] });
    // Locked, nothing is conditional: the sender's bucket is written as decided, clients' slots need nothing.
    expect(p.senderCharges).toEqual([]);
    expect([...p.senderBuckets]).toEqual([["s:alpha", { tokens: 499, updatedAt: NOW }]]);
    expect(p.clients).toEqual([["c1", [0, "t-c1", [["*", 1, 3, 0, 0], ["alpha", 1, 2, 0, 0]]]], ["c2", [1, "t-c2", [["*", 1, 3, 1, 0], ["alpha", 1, 2, 1, 0]]]]]);
    expect(p.clientsLocked).toBe(true);
  });

  it("decides on the buckets as locked, not as first read: a client charged meanwhile is limited, one refilled meanwhile is not", () => {
    const e1 = event("alpha", "e1", rcpt("c1", "c2"));
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: {}, c2: { buckets: { "*": [0, NOW] } } }), limits: LIMITS, now: NOW };
    const locked: LockedBuckets = { clients: new Map<string, StoredBuckets>([["c1", { alpha: [0.5, NOW] }], ["c2", {}]]), senders: new Map() };
    const p = plan(planBatch(inputs, { lockFirst: true, locked }));
    expect(p.deliveries.client).toEqual(["c2"]);
    expect(p.refusals).toMatchObject({ client: ["c1"], reason: ["rate_limited"] });
  });

  it("counts deliveries and charges no bucket with rate limits off, and never asks for a lock", () => {
    const e1 = event("alpha", "e1", rcpt("c1", "c2"));
    const e2 = event("alpha", "e2", rcpt("c2"));
    const p = plan(planBatch({ accepted: [e1, e2], stored: [e1, e2], read: read({ c1: {}, c2: { buckets: { "*": [0, NOW] } } }), limits: undefined, now: NOW }, { lockFirst: true }));
    expect(p.clients).toEqual([["c1", [1, "t-c1"]], ["c2", [2, "t-c2"]]]);
    expect(p.deliveries.ordinal).toEqual([1, 1, 2]);
    expect(p.senderCharges).toEqual([]);
  });

  it("asks for the buckets locked when a sender's is short of the batch, or when told to lock first; then charges them exactly", () => {
    const e1 = event("alpha", "e1", rcpt("c1"));
    const inputs: PlanInputs = { accepted: [e1], stored: [e1], read: read({ c1: {} }, new Map([["s:alpha", { tokens: 0.5, updatedAt: NOW }]])), limits: LIMITS, now: NOW };
    expect(planBatch(inputs, { lockFirst: false })).toEqual({ kind: "lock", clients: ["c1"], senders: ["s:alpha"] });
    const roomy: PlanInputs = { ...inputs, read: read({ c1: {} }) };
    expect(planBatch(roomy, { lockFirst: true })).toEqual({ kind: "lock", clients: ["c1"], senders: ["s:alpha"] });
    const p = plan(planBatch(inputs, { lockFirst: false, locked: { clients: new Map([["c1", {}]]), senders: new Map([["s:alpha", { tokens: 500, updatedAt: NOW }]]) } }));
    expect(p.senderCharges).toEqual([]);
    expect([...p.senderBuckets]).toEqual([["s:alpha", { tokens: 499, updatedAt: NOW }]]);
    expect(p.deliveries.client).toEqual(["c1"]);
  });

  it("delays an event its sender's bucket cannot cover, taking it back, until it has waited maxDelaySeconds; then refuses its recipients rate_limited", () => {
    const fresh = event("alpha", "e1", rcpt("c1"), NOW - 10);
    const locked = new Map([["s:alpha", { tokens: 0, updatedAt: NOW }]]);
    const p = plan(planBatch({ accepted: [fresh], stored: [fresh], read: read({ c1: {} }), limits: LIMITS, now: NOW }, { lockFirst: false, locked: { clients: new Map(), senders: locked } }));
    expect(p.outcomes).toEqual([{ streamSeq: fresh.streamSeq, status: "delayed", waitSeconds: 0.1 }]);
    expect(p.takenBack).toEqual([fresh]);
    expect(p.deliveries.client).toEqual([]);
    const old = event("alpha", "e2", rcpt("c1"), NOW - 301);
    const q = plan(planBatch({ accepted: [old], stored: [old], read: read({ c1: {} }), limits: LIMITS, now: NOW }, { lockFirst: false, locked: { clients: new Map(), senders: locked } }));
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
      read: read({ c1: { buckets: { "*": [0, NOW] } }, c2: {} }),
    };
    // c1's bucket is empty: decided on the buckets locked (as they were read).
    const locked: LockedBuckets = { clients: new Map<string, StoredBuckets>([["c1", { "*": [0, NOW] }], ["c2", {}]]), senders: new Map() };
    const p = plan(planBatch(inputs, { lockFirst: false, locked }));
    expect(p.records).toEqual({ iss: ["alpha"], jti: ["none"], refused: ['[["ghost","capability_mismatch"],["c1","rate_limited"],["c2","no_capability"]]'] });
    expect(p.refusals).toEqual({ client: ["ghost"], reason: ["capability_mismatch"], iss: ["alpha"], jti: ["some"] });
    expect(p.deliveries).toEqual({ client: ["c2"], ordinal: [1], iss: ["alpha"], jti: ["some"] });
    // Both are reported; the duplicate is neither a record nor rows again.
    expect(p.reported.jti).toEqual(["none", "some", "dup"]);
    expect(p.outcomes.map((o) => o.status)).toEqual(["stored", "stored", "duplicate"]);
  });

  it("keeps no record of an event it delays: it is taken back, and decided when it comes again", () => {
    const fresh = event("alpha", "e1", rcpt("c1"), NOW - 10);
    const p = plan(planBatch({ accepted: [fresh], stored: [fresh], read: read({ c1: {} }), limits: LIMITS, now: NOW },
      { lockFirst: false, locked: { clients: new Map(), senders: new Map([["s:alpha", { tokens: 0, updatedAt: NOW }]]) } }));
    expect(p.takenBack).toEqual([fresh]);
    expect(p.records.jti).toEqual([]);
  });
});
