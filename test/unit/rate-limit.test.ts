import { describe, expect, it } from "vitest";
import {
  bucketKey, bucketScope, chargeEvent, fullBucket, limitFor, refill, take,
  type Bucket, type BucketState, type Limit, type RateLimits,
} from "../../src/policy/rate-limit.ts";

const T = 1_800_000_000; // an arbitrary "now", seconds since the epoch

const LIMITS: RateLimits = {
  enabled: true,
  client: { rate: 20, burst: 600 },
  senderClient: { rate: 5, burst: 300 },
  sender: { rate: 2000, burst: 20_000 },
  servers: {},
  clients: {},
  maxDelaySeconds: 300,
};

function limits(over: Partial<RateLimits> = {}): RateLimits {
  return { ...LIMITS, ...over };
}

const bucket = (tokens: number, updatedAt = T): Bucket => ({ tokens, updatedAt });

describe("fullBucket", () => {
  it("a bucket nobody has used holds the whole burst, stamped now", () => {
    expect(fullBucket({ rate: 3, burst: 40 }, T)).toEqual({ tokens: 40, updatedAt: T });
  });
});

describe("refill", () => {
  const limit: Limit = { rate: 10, burst: 100 };

  it("adds rate × elapsed seconds and moves the stamp to now", () => {
    expect(refill(bucket(5, T), limit, T + 2)).toEqual({ tokens: 25, updatedAt: T + 2 });
  });

  it("never exceeds the burst, however long the bucket was idle", () => {
    expect(refill(bucket(95, T), limit, T + 1)).toEqual({ tokens: 100, updatedAt: T + 1 });
    expect(refill(bucket(0, T), limit, T + 1_000_000)).toEqual({ tokens: 100, updatedAt: T + 1_000_000 });
  });

  it("caps a bucket that holds more than a lowered burst at the new burst", () => {
    // An override lowered the burst after the bucket was filled under the old limit.
    expect(refill(bucket(600, T), { rate: 1, burst: 3 }, T)).toEqual({ tokens: 3, updatedAt: T });
  });

  it("refills nothing, and keeps the later stamp, when the clock went backwards", () => {
    expect(refill(bucket(7, T), limit, T - 30)).toEqual({ tokens: 7, updatedAt: T });
  });

  it("after a clock step backwards, refills only from the later stamp", () => {
    const back = refill(bucket(0, T), limit, T - 30);
    expect(refill(back, limit, T + 1)).toEqual({ tokens: 10, updatedAt: T + 1 });
  });

  it("refills fractions of a token for fractions of a second and for fractional rates", () => {
    expect(refill(bucket(0, T), limit, T + 0.25)).toEqual({ tokens: 2.5, updatedAt: T + 0.25 });
    expect(refill(bucket(0.5, T), { rate: 0.5, burst: 10 }, T + 1)).toEqual({ tokens: 1, updatedAt: T + 1 });
    expect(refill(bucket(0, T), { rate: 0.25, burst: 10 }, T + 3)).toEqual({ tokens: 0.75, updatedAt: T + 3 });
  });

  it("a rate of 0 never refills", () => {
    expect(refill(bucket(2, T), { rate: 0, burst: 10 }, T + 86_400)).toEqual({ tokens: 2, updatedAt: T + 86_400 });
  });

  it("no time elapsed changes nothing", () => {
    expect(refill(bucket(4, T), limit, T)).toEqual({ tokens: 4, updatedAt: T });
  });
});

describe("take", () => {
  const limit: Limit = { rate: 10, burst: 100 };

  it("takes one token by default", () => {
    expect(take(bucket(5), limit, T)).toEqual({ ok: true, bucket: { tokens: 4, updatedAt: T } });
  });

  it("takes n tokens when there are at least n, down to exactly zero", () => {
    expect(take(bucket(30), limit, T, 12)).toEqual({ ok: true, bucket: { tokens: 18, updatedAt: T } });
    expect(take(bucket(12), limit, T, 12)).toEqual({ ok: true, bucket: { tokens: 0, updatedAt: T } });
  });

  it("taking 0 tokens always succeeds and only refills", () => {
    expect(take(bucket(0, T - 1), limit, T, 0)).toEqual({ ok: true, bucket: { tokens: 10, updatedAt: T } });
  });

  it("refills before taking", () => {
    expect(take(bucket(0, T), limit, T + 0.5, 5)).toEqual({ ok: true, bucket: { tokens: 0, updatedAt: T + 0.5 } });
  });

  it("refuses when short, charging nothing (the refilled bucket comes back) and saying exactly how long to wait", () => {
    // 2 stored + 0.25 s × 10/s = 4.5 now; 3.5 more needed at 10/s.
    expect(take(bucket(2, T - 0.25), limit, T, 8)).toEqual({ ok: false, bucket: { tokens: 4.5, updatedAt: T }, waitSeconds: 0.35 });
    expect(take(bucket(0), limit, T)).toEqual({ ok: false, bucket: { tokens: 0, updatedAt: T }, waitSeconds: 0.1 });
  });

  it("the wait it names is exactly enough: after waitSeconds the same take succeeds, and not a moment before", () => {
    const cases: [Bucket, Limit, number][] = [
      [bucket(0.25), { rate: 0.5, burst: 10 }, 1], // wait 1.5 s
      [bucket(0), { rate: 4, burst: 1000 }, 1000], // wait 250 s
      [bucket(3), { rate: 2, burst: 8 }, 8], // wait 2.5 s
      [bucket(0.75), { rate: 0.125, burst: 1 }, 1], // wait 2 s
    ];
    for (const [b, l, n] of cases) {
      const refused = take(b, l, T, n);
      expect(refused.ok).toBe(false);
      if (refused.ok) continue;
      expect(refused.waitSeconds).toBe((n - b.tokens) / l.rate);
      expect(take(b, l, T + refused.waitSeconds, n)).toEqual({ ok: true, bucket: { tokens: 0, updatedAt: T + refused.waitSeconds } });
      expect(take(b, l, T + refused.waitSeconds * 0.99, n).ok).toBe(false);
    }
  });

  it("the wait counts from the refilled amount, not the stored one", () => {
    // 1 stored + 1 s × 2/s = 3 now; 5 more needed at 2/s.
    const r = take(bucket(1, T - 1), { rate: 2, burst: 100 }, T, 8);
    expect(r).toEqual({ ok: false, bucket: { tokens: 3, updatedAt: T }, waitSeconds: 2.5 });
  });

  it("the wait is Infinity when n exceeds the burst, even with a positive rate", () => {
    expect(take(bucket(100), limit, T, 101)).toEqual({ ok: false, bucket: { tokens: 100, updatedAt: T }, waitSeconds: Infinity });
  });

  it("the wait is Infinity when the rate is 0", () => {
    expect(take(bucket(0), { rate: 0, burst: 10 }, T)).toEqual({ ok: false, bucket: { tokens: 0, updatedAt: T }, waitSeconds: Infinity });
    expect(take(bucket(4), { rate: 0, burst: 10 }, T, 5)).toEqual({ ok: false, bucket: { tokens: 4, updatedAt: T }, waitSeconds: Infinity });
  });

  it("with a rate of 0, what is left can still be taken", () => {
    expect(take(bucket(4), { rate: 0, burst: 10 }, T, 4)).toEqual({ ok: true, bucket: { tokens: 0, updatedAt: T } });
  });

  it("n equal to the burst is possible from a full bucket", () => {
    expect(take(fullBucket(limit, T), limit, T, 100)).toEqual({ ok: true, bucket: { tokens: 0, updatedAt: T } });
  });

  it("a clock gone backwards neither refills nor rewinds the stamp when taking", () => {
    expect(take(bucket(3, T), limit, T - 10, 2)).toEqual({ ok: true, bucket: { tokens: 1, updatedAt: T } });
    expect(take(bucket(0, T), limit, T - 10)).toEqual({ ok: false, bucket: { tokens: 0, updatedAt: T }, waitSeconds: 0.1 });
  });

  it("does not mutate the bucket it was given", () => {
    const b = Object.freeze(bucket(5, T - 1));
    take(b, limit, T, 3);
    expect(b).toEqual({ tokens: 5, updatedAt: T - 1 });
  });
});

describe("bucketKey", () => {
  it("names the client, sender and (sender, client) buckets apart", () => {
    expect(bucketKey("client", "alpha", "bob")).toBe("c:bob");
    expect(bucketKey("sender", "alpha", "bob")).toBe("s:alpha");
    expect(bucketKey("sender_client", "alpha", "bob")).toBe("sc:alpha:bob");
  });

  it("a client's bucket is shared by all senders, a sender's by all clients", () => {
    expect(bucketKey("client", "alpha", "bob")).toBe(bucketKey("client", "gamma", "bob"));
    expect(bucketKey("sender", "alpha", "bob")).toBe(bucketKey("sender", "alpha", ""));
    expect(bucketKey("sender_client", "alpha", "bob")).not.toBe(bucketKey("sender_client", "gamma", "bob"));
    expect(bucketKey("sender_client", "alpha", "bob")).not.toBe(bucketKey("sender_client", "alpha", "bart"));
  });

  it("bucketScope reads back every key, with client ids that hold ':', '@' and '/'", () => {
    for (const client of ["bob", "a:b", "x@y/z:1", "c:d:e"]) {
      for (const sender of ["alpha", "beta.example.org"]) {
        expect(bucketScope(bucketKey("client", sender, client))).toEqual({ scope: "client", client });
        expect(bucketScope(bucketKey("sender", sender, client))).toEqual({ scope: "sender", sender });
        expect(bucketScope(bucketKey("sender_client", sender, client))).toEqual({ scope: "sender_client", sender, client });
      }
    }
  });
});

describe("limitFor", () => {
  const trusted: Limit = { rate: 50_000, burst: 100_000 };
  const bot: Limit = { rate: 500, burst: 5000 };
  const l = limits({ servers: { "trusted.example": trusted }, clients: { bot } });

  it("without overrides, each scope has its configured default", () => {
    expect(limitFor(LIMITS, "client", "alpha", "bob")).toEqual(LIMITS.client);
    expect(limitFor(LIMITS, "sender", "alpha", "bob")).toEqual(LIMITS.sender);
    expect(limitFor(LIMITS, "sender_client", "alpha", "bob")).toEqual(LIMITS.senderClient);
  });

  it("a server override replaces the sender limit of that server only", () => {
    expect(limitFor(l, "sender", "trusted.example", "")).toEqual(trusted);
    expect(limitFor(l, "sender", "alpha", "")).toEqual(LIMITS.sender);
  });

  it("a client override replaces the client limit of that client only", () => {
    expect(limitFor(l, "client", "alpha", "bot")).toEqual(bot);
    expect(limitFor(l, "client", "trusted.example", "bot")).toEqual(bot);
    expect(limitFor(l, "client", "alpha", "bob")).toEqual(LIMITS.client);
  });

  it("a server override does not touch client buckets, nor a client override the sender's", () => {
    expect(limitFor(l, "client", "trusted.example", "bob")).toEqual(LIMITS.client);
    expect(limitFor(l, "sender", "alpha", "bot")).toEqual(LIMITS.sender);
  });

  it("a client's own limit also replaces the (sender, client) limit for that client; a server override does not", () => {
    expect(limitFor(l, "sender_client", "trusted.example", "bot")).toEqual(l.clients.bot);
    expect(limitFor(l, "sender_client", "trusted.example", "carol")).toEqual(LIMITS.senderClient);
  });

  it("an override named like a client does not apply as a server override, and vice versa", () => {
    const crossed = limits({ servers: { bob: trusted }, clients: { alpha: bot } });
    expect(limitFor(crossed, "client", "bob", "carol")).toEqual(LIMITS.client);
    expect(limitFor(crossed, "sender", "alpha", "carol")).toEqual(LIMITS.sender);
  });
});

describe("chargeEvent", () => {
  const snapshot = (state: BucketState): Record<string, Bucket> => Object.fromEntries([...state].map(([k, b]) => [k, { ...b }]));

  it("no candidates: charged, nothing limited, no bucket touched or created", () => {
    const state: BucketState = new Map();
    expect(chargeEvent(LIMITS, state, "alpha", [], T)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.size).toBe(0);
  });

  it("missing buckets start full: one delivery leaves burst − 1 in each of its three buckets", () => {
    const state: BucketState = new Map();
    const r = chargeEvent(LIMITS, state, "alpha", ["bob"], T);
    expect(r).toEqual({ kind: "charged", limited: new Set() });
    expect(snapshot(state)).toEqual({
      "s:alpha": { tokens: 19_999, updatedAt: T },
      "c:bob": { tokens: 599, updatedAt: T },
      "sc:alpha:bob": { tokens: 299, updatedAt: T },
    });
  });

  it("missing buckets start full at their overridden burst", () => {
    const l = limits({ servers: { alpha: { rate: 1, burst: 1000 } }, clients: { bot: { rate: 1, burst: 2 } } });
    const state: BucketState = new Map();
    expect(chargeEvent(l, state, "alpha", ["bot"], T)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.get("s:alpha")).toEqual({ tokens: 999, updatedAt: T });
    expect(state.get("c:bot")).toEqual({ tokens: 1, updatedAt: T });
  });

  it("several recipients each take one token from their own client and (sender, client) buckets; the sender pays for all", () => {
    const state: BucketState = new Map();
    expect(chargeEvent(LIMITS, state, "alpha", ["bob", "carol", "dan"], T)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.get("s:alpha")).toEqual({ tokens: 19_997, updatedAt: T });
    for (const c of ["bob", "carol", "dan"]) {
      expect(state.get(`c:${c}`)).toEqual({ tokens: 599, updatedAt: T });
      expect(state.get(`sc:alpha:${c}`)).toEqual({ tokens: 299, updatedAt: T });
    }
  });

  it("over the sender's bucket, the whole event is delayed by the exact wait and nothing at all is charged", () => {
    const l = limits({ servers: { alpha: { rate: 10, burst: 1000 } } });
    const state: BucketState = new Map([
      ["s:alpha", bucket(2, T)],
      ["c:bob", bucket(5, T - 1)],
    ]);
    const before = snapshot(state);
    // Three recipients need three tokens; two are there: one more at 10/s.
    expect(chargeEvent(l, state, "alpha", ["bob", "carol", "dan"], T)).toEqual({ kind: "delay", waitSeconds: 0.1 });
    expect(snapshot(state)).toEqual(before);
  });

  it("the sender check is for the whole event even when a single recipient would fit", () => {
    const l = limits({ servers: { alpha: { rate: 4, burst: 1000 } } });
    const state: BucketState = new Map([["s:alpha", bucket(1, T)]]);
    expect(chargeEvent(l, state, "alpha", ["bob", "carol"], T)).toEqual({ kind: "delay", waitSeconds: 0.25 });
    expect(snapshot(state)).toEqual({ "s:alpha": { tokens: 1, updatedAt: T } });
  });

  it("a sender with a rate of 0 and an empty bucket is delayed with an infinite wait", () => {
    const l = limits({ servers: { alpha: { rate: 0, burst: 1000 } } });
    const state: BucketState = new Map([["s:alpha", bucket(0, T - 3600)]]);
    expect(chargeEvent(l, state, "alpha", ["bob"], T)).toEqual({ kind: "delay", waitSeconds: Infinity });
  });

  it("an event with more recipients than the sender's burst waits forever (never a partial charge)", () => {
    const l = limits({ sender: { rate: 100, burst: 2 } });
    const state: BucketState = new Map();
    expect(chargeEvent(l, state, "alpha", ["a1", "a2", "a3"], T)).toEqual({ kind: "delay", waitSeconds: Infinity });
    expect(state.size).toBe(0);
  });

  it("the sender's bucket refills with time before the check", () => {
    const l = limits({ servers: { alpha: { rate: 4, burst: 1000 } } });
    const state: BucketState = new Map([["s:alpha", bucket(0, T)]]);
    expect(chargeEvent(l, state, "alpha", ["bob"], T)).toEqual({ kind: "delay", waitSeconds: 0.25 });
    expect(chargeEvent(l, state, "alpha", ["bob"], T + 0.25)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.get("s:alpha")).toEqual({ tokens: 0, updatedAt: T + 0.25 });
  });

  it("an empty client bucket limits that recipient alone; the others of the event get through", () => {
    const state: BucketState = new Map([["c:bob", bucket(0, T)]]);
    const r = chargeEvent(LIMITS, state, "alpha", ["alice", "bob", "carol"], T);
    expect(r).toEqual({ kind: "charged", limited: new Set(["bob"]) });
    expect(state.get("c:alice")).toEqual({ tokens: 599, updatedAt: T });
    expect(state.get("c:carol")).toEqual({ tokens: 599, updatedAt: T });
  });

  it("a recipient limited by its client bucket costs nothing in its (sender, client) bucket nor the sender's", () => {
    const state: BucketState = new Map([
      ["s:alpha", bucket(100, T)],
      ["c:bob", bucket(0.5, T)],
      ["sc:alpha:bob", bucket(10, T)],
    ]);
    expect(chargeEvent(LIMITS, state, "alpha", ["bob"], T)).toEqual({ kind: "charged", limited: new Set(["bob"]) });
    expect(snapshot(state)).toEqual({
      "s:alpha": { tokens: 100, updatedAt: T },
      "c:bob": { tokens: 0.5, updatedAt: T },
      "sc:alpha:bob": { tokens: 10, updatedAt: T },
    });
  });

  it("a recipient limited by its (sender, client) bucket costs nothing in its client bucket nor the sender's", () => {
    const state: BucketState = new Map([
      ["s:alpha", bucket(100, T)],
      ["c:bob", bucket(10, T)],
      ["sc:alpha:bob", bucket(0, T)],
    ]);
    expect(chargeEvent(LIMITS, state, "alpha", ["bob"], T)).toEqual({ kind: "charged", limited: new Set(["bob"]) });
    expect(snapshot(state)).toEqual({
      "s:alpha": { tokens: 100, updatedAt: T },
      "c:bob": { tokens: 10, updatedAt: T },
      "sc:alpha:bob": { tokens: 0, updatedAt: T },
    });
  });

  it("a limited recipient's buckets keep their refill (stamped now), not the old state", () => {
    const state: BucketState = new Map([
      ["c:bob", bucket(0, T - 1 / 32)], // refills 0.625 at 20/s: still under one token
      ["sc:alpha:bob", bucket(3, T - 1)], // refills 5 at 5/s
    ]);
    expect(chargeEvent(LIMITS, state, "alpha", ["bob"], T)).toEqual({ kind: "charged", limited: new Set(["bob"]) });
    expect(state.get("c:bob")).toEqual({ tokens: 0.625, updatedAt: T });
    expect(state.get("sc:alpha:bob")).toEqual({ tokens: 8, updatedAt: T });
  });

  it("the sender's bucket pays only for the recipients that got through", () => {
    const state: BucketState = new Map([
      ["s:alpha", bucket(10, T)],
      ["c:bob", bucket(0, T)],
      ["sc:alpha:carol", bucket(0, T)],
    ]);
    const r = chargeEvent(LIMITS, state, "alpha", ["alice", "bob", "carol", "dan"], T);
    expect(r).toEqual({ kind: "charged", limited: new Set(["bob", "carol"]) });
    expect(state.get("s:alpha")).toEqual({ tokens: 8, updatedAt: T });
  });

  it("every recipient limited: the sender's bucket is not charged (only refilled)", () => {
    const l = limits({ servers: { alpha: { rate: 1, burst: 1000 } } });
    const state: BucketState = new Map([
      ["s:alpha", bucket(5, T - 2)],
      ["c:bob", bucket(0, T)],
      ["c:carol", bucket(0, T)],
    ]);
    expect(chargeEvent(l, state, "alpha", ["bob", "carol"], T)).toEqual({ kind: "charged", limited: new Set(["bob", "carol"]) });
    expect(state.get("s:alpha")).toEqual({ tokens: 7, updatedAt: T });
  });

  it("a client override lets a bot receive past the default client burst, and a lower one limits sooner", () => {
    const l = limits({ clients: { bot: { rate: 1, burst: 1000 }, quiet: { rate: 1, burst: 1 } } });
    const state: BucketState = new Map([["c:bot", bucket(700, T)], ["c:bob", bucket(700, T)]]);
    expect(chargeEvent(l, state, "alpha", ["bot", "bob", "quiet"], T)).toEqual({ kind: "charged", limited: new Set() });
    // The default burst (600) caps bob's bucket on refill; bot keeps its 700.
    expect(state.get("c:bot")).toEqual({ tokens: 699, updatedAt: T });
    expect(state.get("c:bob")).toEqual({ tokens: 599, updatedAt: T });
    expect(chargeEvent(l, state, "alpha", ["quiet"], T)).toEqual({ kind: "charged", limited: new Set(["quiet"]) });
  });

  it("across several events of one batch: a client's burst is shared by all senders, a (sender, client) burst per sender", () => {
    const l = limits({ client: { rate: 1, burst: 3 }, senderClient: { rate: 1, burst: 2 } });
    const state: BucketState = new Map();
    const results = [
      chargeEvent(l, state, "alpha", ["bob"], T),
      chargeEvent(l, state, "alpha", ["bob"], T),
      chargeEvent(l, state, "alpha", ["bob"], T), // alpha's (alpha, bob) bucket is empty
      chargeEvent(l, state, "gamma", ["bob"], T), // bob's own bucket still has one
      chargeEvent(l, state, "gamma", ["bob"], T), // bob's bucket is empty
    ];
    expect(results.map((r) => (r.kind === "charged" ? [...r.limited] : r.kind))).toEqual([[], [], ["bob"], [], ["bob"]]);
    expect(snapshot(state)).toEqual({
      "s:alpha": { tokens: 19_998, updatedAt: T },
      "s:gamma": { tokens: 19_999, updatedAt: T },
      "c:bob": { tokens: 0, updatedAt: T },
      "sc:alpha:bob": { tokens: 0, updatedAt: T },
      "sc:gamma:bob": { tokens: 1, updatedAt: T },
    });
  });

  it("across several events: exactly the burst of a client gets through, the rest is limited, and the sender pays for the burst only", () => {
    const l = limits({ clients: { flooded: { rate: 1, burst: 50 } } });
    const state: BucketState = new Map();
    let through = 0;
    let limitedCount = 0;
    for (let i = 0; i < 1000; i++) {
      const r = chargeEvent(l, state, "alpha", ["flooded"], T);
      expect(r.kind).toBe("charged");
      if (r.kind === "charged") {
        if (r.limited.has("flooded")) limitedCount += 1;
        else through += 1;
      }
    }
    expect([through, limitedCount]).toEqual([50, 950]);
    expect(state.get("s:alpha")).toEqual({ tokens: 20_000 - 50, updatedAt: T });
    expect(state.get("c:flooded")).toEqual({ tokens: 0, updatedAt: T });
    // The client's override is its (sender, client) limit too: both buckets ran dry together.
    expect(state.get("sc:alpha:flooded")).toEqual({ tokens: 0, updatedAt: T });
  });

  it("across several events: time between events refills, and an event delayed in the middle charges nothing", () => {
    const l = limits({ servers: { alpha: { rate: 8, burst: 1000 } }, clients: { bob: { rate: 2, burst: 1 } } });
    const state: BucketState = new Map([["s:alpha", bucket(2, T)]]);
    expect(chargeEvent(l, state, "alpha", ["bob", "carol"], T)).toEqual({ kind: "charged", limited: new Set() });
    const afterFirst = snapshot(state);
    expect(afterFirst["s:alpha"]).toEqual({ tokens: 0, updatedAt: T });
    expect(chargeEvent(l, state, "alpha", ["bob", "carol"], T)).toEqual({ kind: "delay", waitSeconds: 0.25 });
    expect(snapshot(state)).toEqual(afterFirst);
    // 0.25 s later: 2 sender tokens; bob's bucket has refilled half a token, so he alone is limited.
    expect(chargeEvent(l, state, "alpha", ["bob", "carol"], T + 0.25)).toEqual({ kind: "charged", limited: new Set(["bob"]) });
    expect(state.get("s:alpha")).toEqual({ tokens: 1, updatedAt: T + 0.25 });
    expect(state.get("c:bob")).toEqual({ tokens: 0.5, updatedAt: T + 0.25 });
    // 0.25 s later still: bob has a whole token again.
    expect(chargeEvent(l, state, "alpha", ["bob"], T + 0.5)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.get("c:bob")).toEqual({ tokens: 0, updatedAt: T + 0.5 });
  });

  it("one sender's delay leaves another sender's events unaffected", () => {
    const l = limits({ servers: { alpha: { rate: 0, burst: 1000 } } });
    const state: BucketState = new Map([["s:alpha", bucket(0, T)]]);
    expect(chargeEvent(l, state, "alpha", ["bob"], T).kind).toBe("delay");
    expect(chargeEvent(l, state, "gamma", ["bob"], T)).toEqual({ kind: "charged", limited: new Set() });
    expect(state.get("c:bob")).toEqual({ tokens: 599, updatedAt: T });
  });

  it("only the buckets of the event's sender and recipients are written", () => {
    const other = bucket(3, T - 100);
    const state: BucketState = new Map([["c:zed", other], ["s:gamma", other], ["sc:gamma:bob", other]]);
    chargeEvent(LIMITS, state, "alpha", ["bob"], T);
    expect(state.get("c:zed")).toBe(other);
    expect(state.get("s:gamma")).toBe(other);
    expect(state.get("sc:gamma:bob")).toBe(other);
  });
});
