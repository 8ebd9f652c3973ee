/**
 * What one caller may hold of an API process: failed credential attempts per
 * source address, and requests waiting (long-polls) per client and in all. The
 * decisions are values; the routes turn a refusal into 429 with Retry-After.
 */
import { fullBucket, take, type Bucket, type Limit } from "../policy/rate-limit.ts";

/**
 * The throttling key of a peer address: an IPv4 address as it is, an IPv6
 * address by its /64 (one subscriber's allocation, which it can fill with
 * addresses at will), an IPv4-mapped IPv6 address as the IPv4 address.
 */
export function sourceOf(ip: string): string {
  const address = ip.split("%")[0]!;
  if (!address.includes(":")) return address;
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(address);
  if (mapped) return mapped[1]!;
  const [head = "", tail] = address.split("::");
  const left = head === "" ? [] : head.split(":");
  const right = tail === undefined || tail === "" ? [] : tail.split(":");
  const groups = tail === undefined ? left : [...left, ...Array<string>(Math.max(0, 8 - left.length - right.length)).fill("0"), ...right];
  return `${groups.slice(0, 4).map((g) => (Number.parseInt(g, 16) || 0).toString(16)).join(":")}::/64`;
}

/** Where sources beyond `maxSources` are counted, together. */
const OVERFLOW = "(overflow)";

/**
 * A token bucket of failures per source: while a source's bucket is empty, its
 * attempts are refused without being checked, so guessing runs at the refill
 * rate. Successes cost nothing. At most `maxSources` are remembered: a source
 * whose bucket has refilled is forgotten first (it is as good as new), and
 * when every remembered one is still draining, new failing sources share one
 * overflow bucket, and sources not remembered are checked against it. So an
 * attacker cycling through more addresses than are remembered gets the refill
 * rate of one source, not a fresh burst per address (measured before: 4,190
 * guesses a second from 10,001 cycling /64s).
 */
export class FailureThrottle {
  readonly #buckets = new Map<string, Bucket>();
  readonly #limit: Limit;
  readonly #maxSources: number;

  constructor(limit: Limit, maxSources = 100_000) {
    this.#limit = limit;
    this.#maxSources = maxSources;
  }

  #bucketOf(source: string): Bucket | undefined {
    return this.#buckets.get(source) ?? (this.#buckets.size >= this.#maxSources ? this.#buckets.get(OVERFLOW) : undefined);
  }

  /** Whole seconds until `source` may try again; 0 when it may now. */
  retryAfter(source: string, now: number): number {
    const bucket = this.#bucketOf(source);
    if (bucket === undefined) return 0;
    const attempt = take(bucket, this.#limit, now);
    return attempt.ok ? 0 : Math.max(1, Math.ceil(attempt.waitSeconds));
  }

  failed(source: string, now: number): void {
    let key = source;
    if (!this.#buckets.has(source) && this.#buckets.size >= this.#maxSources && !this.#forgetOneRefilled(now)) key = OVERFLOW;
    const attempt = take(this.#buckets.get(key) ?? fullBucket(this.#limit, now), this.#limit, now);
    this.#buckets.delete(key);
    this.#buckets.set(key, attempt.bucket);
  }

  /** Forgets the least recently failed source whose bucket is full again; false if none is (among the oldest few). */
  #forgetOneRefilled(now: number): boolean {
    let looked = 0;
    for (const [key, bucket] of this.#buckets) {
      if (key !== OVERFLOW && take(bucket, this.#limit, now, this.#limit.burst).ok) {
        this.#buckets.delete(key);
        return true;
      }
      // Oldest first: past a few, the rest failed more recently still.
      if (++looked >= 64) return false;
    }
    return false;
  }

  get sources(): number {
    return this.#buckets.size;
  }
}

export type WaitSlot =
  | { readonly ok: true; release(): void }
  | { readonly ok: false; readonly limit: "holder" | "process" };

/**
 * Requests that hold a connection open while they wait: each costs memory and
 * a socket until it answers, so a client gets at most `perHolder` at once and
 * the process at most `perProcess`. The backend (a holder of `undefined`) is
 * bounded by the process's cap alone: it waits for one fan-out's reports per
 * request, as many as it sends.
 */
export class WaitSlots {
  readonly #held = new Map<string, number>();
  #total = 0;
  readonly perHolder: number;
  readonly perProcess: number;

  constructor(limits: { perHolder: number; perProcess: number }) {
    this.perHolder = limits.perHolder;
    this.perProcess = limits.perProcess;
  }

  get waiting(): number {
    return this.#total;
  }

  acquire(holder: string | undefined): WaitSlot {
    const held = holder === undefined ? 0 : this.#held.get(holder) ?? 0;
    if (holder !== undefined && held >= this.perHolder) return { ok: false, limit: "holder" };
    if (this.#total >= this.perProcess) return { ok: false, limit: "process" };
    if (holder !== undefined) this.#held.set(holder, held + 1);
    this.#total += 1;
    let released = false;
    return {
      ok: true,
      release: () => {
        if (released) return;
        released = true;
        this.#total -= 1;
        if (holder === undefined) return;
        const left = this.#held.get(holder)! - 1;
        if (left === 0) this.#held.delete(holder);
        else this.#held.set(holder, left);
      },
    };
  }
}
