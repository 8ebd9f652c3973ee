import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { FailureThrottle, sourceOf, WaitSlots } from "../../src/http/limits.ts";

describe("sourceOf: the address a throttle counts failures against", () => {
  it("keeps IPv4 addresses, unwraps IPv4-mapped IPv6, and groups IPv6 by its /64", () => {
    const cases: [string, string][] = [
      ["127.0.0.1", "127.0.0.1"],
      ["203.0.113.9", "203.0.113.9"],
      ["::ffff:203.0.113.9", "203.0.113.9"],
      ["::FFFF:10.0.0.1", "10.0.0.1"],
      ["2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"],
      ["2001:db8:1:2::1", "2001:db8:1:2::/64"],
      ["2001:0db8:0001:0002:ffff::", "2001:db8:1:2::/64"],
      ["2001:db8::1", "2001:db8:0:0::/64"],
      ["::1", "0:0:0:0::/64"],
      ["fe80::1%eth0", "fe80:0:0:0::/64"],
    ];
    for (const [ip, source] of cases) expect({ ip, source: sourceOf(ip) }).toEqual({ ip, source });
  });

  it("puts every address of one /64 together, and addresses of different /64s apart", () => {
    const group = fc.integer({ min: 0, max: 0xffff });
    fc.assert(fc.property(fc.array(group, { minLength: 8, maxLength: 8 }), fc.array(group, { minLength: 4, maxLength: 4 }), (a, tail) => {
      const full = a.map((g) => g.toString(16)).join(":");
      const sibling = [...a.slice(0, 4), ...tail].map((g) => g.toString(16)).join(":");
      expect(sourceOf(full)).toBe(sourceOf(sibling));
      const other = [...a.slice(0, 3), (a[3]! + 1) % 0x10000, ...a.slice(4)].map((g) => g.toString(16)).join(":");
      expect(sourceOf(other)).not.toBe(sourceOf(full));
    }));
  });
});

describe("FailureThrottle", () => {
  const limit = { rate: 0.2, burst: 10 };

  it("lets a source fail `burst` times, then refuses it until a failure has refilled, saying when", () => {
    const t = new FailureThrottle(limit);
    for (let i = 0; i < 10; i++) {
      expect(t.retryAfter("a", 100)).toBe(0);
      t.failed("a", 100);
    }
    expect(t.retryAfter("a", 100)).toBe(5);
    expect(t.retryAfter("a", 102)).toBe(3);
    expect(t.retryAfter("a", 104.5)).toBe(1);
    expect(t.retryAfter("a", 105)).toBe(0);
    expect(t.retryAfter("b", 100)).toBe(0);
  });

  it("remembers at most maxSources: forgets a source whose bucket has refilled, else counts newcomers in one shared bucket", () => {
    const t = new FailureThrottle({ rate: 1, burst: 2 }, 3);
    for (const s of ["a", "b", "c"]) {
      t.failed(s, 0);
      t.failed(s, 0);
    }
    expect(["a", "b", "c"].map((s) => t.retryAfter(s, 0))).toEqual([1, 1, 1]);
    // All three still draining: newcomers fail into the overflow bucket, and an unknown source is judged by it.
    t.failed("d", 0);
    t.failed("e", 0);
    expect(t.retryAfter("f", 0)).toBe(1);
    expect(t.sources).toBe(4);
    // Two seconds on, a's bucket is full again: a newcomer takes its place and has its own bucket.
    t.failed("a", 2);
    expect(t.retryAfter("g", 3)).toBe(0);
  });

  it("gives an attacker cycling through more addresses than it remembers no more than one burst and the refill rate", () => {
    const limit = { rate: 0.2, burst: 10 };
    const t = new FailureThrottle(limit, 100);
    let checked = 0;
    for (let second = 0; second < 60; second++) {
      for (let i = 0; i < 200; i++) {
        const source = `10.0.${i >> 8}.${i & 255}`;
        if (t.retryAfter(source, second) > 0) continue;
        checked += 1;
        t.failed(source, second);
      }
    }
    // 100 remembered sources' bursts, the overflow's burst, and the refill of all of them over a minute.
    expect(checked).toBeLessThanOrEqual(100 * 10 + 10 + 101 * 0.2 * 60);
  });

  it("never refuses a source with fewer than `burst` failures in any window the rate refills, whatever the order", () => {
    fc.assert(fc.property(fc.array(fc.tuple(fc.constantFrom("a", "b", "c"), fc.integer({ min: 0, max: 100 })), { maxLength: 60 }), (events) => {
      const t = new FailureThrottle({ rate: 1, burst: 3 });
      const failures = new Map<string, number[]>();
      let now = 0;
      for (const [source, gap] of events) {
        now += gap / 10;
        const recent = (failures.get(source) ?? []).filter((at) => at > now - 3);
        // Fewer than `burst` failures in the last burst/rate seconds: the bucket cannot be empty.
        if (recent.length < 3) expect(t.retryAfter(source, now)).toBe(0);
        if (t.retryAfter(source, now) === 0) {
          t.failed(source, now);
          failures.set(source, [...recent, now]);
        }
      }
    }));
  });
});

describe("WaitSlots", () => {
  it("gives a holder at most perHolder slots and the process at most perProcess, and a release frees exactly one", () => {
    const slots = new WaitSlots({ perHolder: 2, perProcess: 3 });
    const a1 = slots.acquire("a");
    const a2 = slots.acquire("a");
    expect([a1.ok, a2.ok]).toEqual([true, true]);
    expect(slots.acquire("a")).toEqual({ ok: false, limit: "holder" });
    const b1 = slots.acquire("b");
    expect(b1.ok).toBe(true);
    expect(slots.acquire("c")).toEqual({ ok: false, limit: "process" });
    expect(slots.waiting).toBe(3);
    if (a1.ok) {
      a1.release();
      a1.release(); // twice is once
    }
    expect(slots.waiting).toBe(2);
    expect(slots.acquire("a").ok).toBe(true);
    expect(slots.acquire("c")).toEqual({ ok: false, limit: "process" });
  });

  it("bounds the backend (no holder) by the process's cap alone", () => {
    const slots = new WaitSlots({ perHolder: 1, perProcess: 3 });
    const backend = [slots.acquire(undefined), slots.acquire(undefined)];
    expect(backend.map((s) => s.ok)).toEqual([true, true]);
    expect(slots.acquire("a").ok).toBe(true);
    expect(slots.acquire(undefined)).toEqual({ ok: false, limit: "process" });
    if (backend[0]!.ok) backend[0]!.release();
    expect(slots.acquire(undefined).ok).toBe(true);
    expect(slots.waiting).toBe(3);
  });

  it("keeps its counts exact over any sequence of acquires and releases", () => {
    fc.assert(fc.property(fc.array(fc.tuple(fc.boolean(), fc.constantFrom("a", "b", "c", undefined)), { maxLength: 200 }), (ops) => {
      const slots = new WaitSlots({ perHolder: 2, perProcess: 5 });
      const held: { holder: string | undefined; release(): void }[] = [];
      for (const [acquire, holder] of ops) {
        if (acquire) {
          const perHolder = held.filter((h) => h.holder === holder).length;
          const slot = slots.acquire(holder);
          const expected = holder !== undefined && perHolder >= 2 ? "holder" : held.length >= 5 ? "process" : "ok";
          expect(slot.ok ? "ok" : slot.limit).toBe(expected);
          if (slot.ok) held.push({ holder, release: slot.release });
        } else {
          const i = held.findIndex((h) => h.holder === holder);
          if (i >= 0) held.splice(i, 1)[0]!.release();
        }
        expect(slots.waiting).toBe(held.length);
      }
    }));
  });
});
