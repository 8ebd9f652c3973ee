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

/**
 * A token bucket of failures per source: while a source's bucket is empty, its
 * attempts are refused without being checked, so guessing runs at the refill
 * rate. Successes cost nothing. At most `maxSources` are remembered (least
 * recently failed go first): memory stays bounded when many addresses fail.
 */
export class FailureThrottle {
  readonly #buckets = new Map<string, Bucket>();
  readonly #limit: Limit;
  readonly #maxSources: number;

  constructor(limit: Limit, maxSources = 10_000) {
    this.#limit = limit;
    this.#maxSources = maxSources;
  }

  /** Whole seconds until `source` may try again; 0 when it may now. */
  retryAfter(source: string, now: number): number {
    const bucket = this.#buckets.get(source);
    if (bucket === undefined) return 0;
    const attempt = take(bucket, this.#limit, now);
    return attempt.ok ? 0 : Math.max(1, Math.ceil(attempt.waitSeconds));
  }

  failed(source: string, now: number): void {
    const attempt = take(this.#buckets.get(source) ?? fullBucket(this.#limit, now), this.#limit, now);
    this.#buckets.delete(source);
    this.#buckets.set(source, attempt.bucket);
    if (this.#buckets.size > this.#maxSources) this.#buckets.delete(this.#buckets.keys().next().value!);
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
