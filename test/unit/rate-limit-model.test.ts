/**
 * chargeEvent inlines take() and refill() (it runs for every delivery). Property:
 * over any sequence of events, from any starting buckets, with any limits and
 * overrides, it decides and leaves exactly what the plain composition of
 * take(), refill() and fullBucket() does: the model below, as chargeEvent was
 * first written.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  bucketKey, chargeEvent, fullBucket, limitFor, refill, take,
  type BucketState, type EventCharge, type Limit, type RateLimits, type Scope,
} from "../../src/policy/rate-limit.ts";

function modelChargeEvent(limits: RateLimits, state: BucketState, sender: string, candidates: readonly string[], now: number): EventCharge {
  const get = (scope: Scope, client: string) => {
    const key = bucketKey(scope, sender, client);
    const limit = limitFor(limits, scope, sender, client);
    return { key, limit, bucket: state.get(key) ?? fullBucket(limit, now) };
  };
  if (candidates.length === 0) return { kind: "charged", limited: new Set() };
  const s = get("sender", "");
  const senderTake = take(s.bucket, s.limit, now, candidates.length);
  if (!senderTake.ok) return { kind: "delay", waitSeconds: senderTake.waitSeconds };
  const limited = new Set<string>();
  let passed = 0;
  for (const cid of candidates) {
    const c = get("client", cid);
    const sc = get("sender_client", cid);
    const ct = take(c.bucket, c.limit, now);
    const sct = take(sc.bucket, sc.limit, now);
    if (ct.ok && sct.ok) {
      state.set(c.key, ct.bucket);
      state.set(sc.key, sct.bucket);
      passed += 1;
    } else {
      state.set(c.key, refill(c.bucket, c.limit, now));
      state.set(sc.key, refill(sc.bucket, sc.limit, now));
      limited.add(cid);
    }
  }
  state.set(s.key, take(s.bucket, s.limit, now, passed).bucket);
  return { kind: "charged", limited };
}

const T = 1_800_000_000;
const SENDERS = ["alpha", "beta"];
const CLIENTS = ["c1", "c2", "c3", "c4"];

// Small limits and fractional rates, so buckets run dry, refill in part and hit the burst.
const limitArb: fc.Arbitrary<Limit> = fc.record({
  rate: fc.oneof(fc.constantFrom(0, 0.5, 1, 2.5), fc.double({ min: 0, max: 10, noNaN: true })),
  burst: fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.integer({ min: 0, max: 8 })),
});

const limitsArb: fc.Arbitrary<RateLimits> = fc.record({
  enabled: fc.constant(true),
  client: limitArb,
  senderClient: limitArb,
  sender: limitArb,
  servers: fc.dictionary(fc.constantFrom(...SENDERS), limitArb, { maxKeys: 2 }),
  clients: fc.dictionary(fc.constantFrom(...CLIENTS), limitArb, { maxKeys: 2 }),
  maxDelaySeconds: fc.constant(300),
});

// Stamps around T, some in the future (a clock that went backwards).
const bucketArb = fc.record({ tokens: fc.double({ min: 0, max: 10, noNaN: true }), updatedAt: fc.double({ min: T - 5, max: T + 2, noNaN: true }) });

const stateArb: fc.Arbitrary<[string, { tokens: number; updatedAt: number }][]> = fc.array(
  fc.tuple(
    fc.oneof(
      fc.constantFrom(...SENDERS).map((s) => bucketKey("sender", s, "")),
      fc.constantFrom(...CLIENTS).map((c) => bucketKey("client", "", c)),
      fc.tuple(fc.constantFrom(...SENDERS), fc.constantFrom(...CLIENTS)).map(([s, c]) => bucketKey("sender_client", s, c)),
    ),
    bucketArb,
  ),
  { maxLength: 8 },
);

const eventsArb = fc.array(
  fc.record({
    sender: fc.constantFrom(...SENDERS),
    candidates: fc.uniqueArray(fc.constantFrom(...CLIENTS), { maxLength: 4 }),
    after: fc.constantFrom(0, 0, 0.1, 0.5, 1, -1),
  }),
  { minLength: 1, maxLength: 12 },
);

describe("chargeEvent against its model", () => {
  it("decides and charges exactly as take()/refill() composed do", () => {
    fc.assert(fc.property(limitsArb, stateArb, eventsArb, (limits, start, events) => {
      const fast: BucketState = new Map(start);
      const model: BucketState = new Map(start);
      let now = T;
      for (const e of events) {
        now += e.after;
        const got = chargeEvent(limits, fast, e.sender, e.candidates, now);
        const want = modelChargeEvent(limits, model, e.sender, e.candidates, now);
        expect(got).toEqual(want);
        expect(Object.fromEntries(fast)).toEqual(Object.fromEntries(model));
      }
    }), { numRuns: 3000 });
  });
});
