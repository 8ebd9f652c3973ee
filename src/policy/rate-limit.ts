/**
 * Token buckets (DESIGN §2, spam prevention) as pure functions of bucket state
 * and time. The store loads and locks the buckets a batch touches, these
 * functions decide, and the store writes the new state in the same transaction
 * that commits the deliveries: exact across worker processes, and a crash never
 * charges for a delivery that was not stored.
 */

export interface Limit {
  /** Tokens (deliveries) added per second. */
  readonly rate: number;
  /** Bucket capacity: how many deliveries may arrive at once after a quiet spell. */
  readonly burst: number;
}

export interface Bucket {
  readonly tokens: number;
  /** Seconds since the epoch. */
  readonly updatedAt: number;
}

export type Scope = "client" | "sender" | "sender_client";

/** A bucket nobody has used starts full. */
export function fullBucket(limit: Limit, now: number): Bucket {
  return { tokens: limit.burst, updatedAt: now };
}

export function refill(bucket: Bucket, limit: Limit, now: number): Bucket {
  return { tokens: refilledTokens(bucket.tokens, bucket.updatedAt, limit, now), updatedAt: Math.max(now, bucket.updatedAt) };
}

export type Take = { readonly ok: true; readonly bucket: Bucket } | { readonly ok: false; readonly bucket: Bucket; readonly waitSeconds: number };

/** Takes `n` tokens, or says how long until there are `n` (Infinity if `n` exceeds the burst). */
export function take(bucket: Bucket, limit: Limit, now: number, n = 1): Take {
  const current = refill(bucket, limit, now);
  if (current.tokens >= n) return { ok: true, bucket: { ...current, tokens: current.tokens - n } };
  const waitSeconds = n > limit.burst || limit.rate <= 0 ? Infinity : (n - current.tokens) / limit.rate;
  return { ok: false, bucket: current, waitSeconds };
}

export function bucketKey(scope: Scope, sender: string, client: string): string {
  switch (scope) {
    case "client": return `c:${client}`;
    case "sender": return `s:${sender}`;
    case "sender_client": return `sc:${sender}:${client}`;
  }
}

/** What a bucketKey names. A homeserver name holds no ':', so the first one after it ends it. */
export function bucketScope(key: string):
  | { readonly scope: "sender"; readonly sender: string }
  | { readonly scope: "client"; readonly client: string }
  | { readonly scope: "sender_client"; readonly sender: string; readonly client: string } {
  if (key.startsWith("s:")) return { scope: "sender", sender: key.slice(2) };
  if (key.startsWith("c:")) return { scope: "client", client: key.slice(2) };
  const colon = key.indexOf(":", 3);
  return { scope: "sender_client", sender: key.slice(3, colon), client: key.slice(colon + 1) };
}

export interface RateLimits {
  readonly enabled: boolean;
  readonly client: Limit;
  readonly sender: Limit;
  readonly senderClient: Limit;
  /** Per-homeserver replacement of `sender` (a trusted peer). */
  readonly servers: Readonly<Record<string, Limit>>;
  /** Per-client replacement of `client` (a bot that receives a lot). */
  readonly clients: Readonly<Record<string, Limit>>;
  /** How long an event over its sender's limit may be delayed before it is refused. */
  readonly maxDelaySeconds: number;
}

/**
 * The largest rate and burst: a trillion deliveries (a second) is no limit at all, and
 * Postgres charges buckets in float8 arithmetic that raises on overflow where JavaScript
 * would give Infinity (a rate of 1e300 after a few seconds' refill). Settings above it are
 * refused (config, `ratelimit set`, the API); limitFor clamps any that got stored before.
 */
export const MAX_LIMIT = 1e12;

export function limitFor(limits: RateLimits, scope: Scope, sender: string, client: string): Limit {
  const limit = scopedLimit(limits, scope, sender, client);
  return limit.rate > MAX_LIMIT || limit.burst > MAX_LIMIT
    ? { rate: Math.min(limit.rate, MAX_LIMIT), burst: Math.min(limit.burst, MAX_LIMIT) }
    : limit;
}

function scopedLimit(limits: RateLimits, scope: Scope, sender: string, client: string): Limit {
  switch (scope) {
    case "client": return limits.clients[client] ?? limits.client;
    case "sender": return limits.servers[sender] ?? limits.sender;
    // A client with its own limit (a bot that receives a lot) gets it from each sender too.
    case "sender_client": return limits.clients[client] ?? limits.senderClient;
  }
}

export type BucketState = Map<string, Bucket>;

export type EventCharge =
  | { readonly kind: "charged"; readonly limited: ReadonlySet<string> }
  | { readonly kind: "delay"; readonly waitSeconds: number };

/** The tokens `refill` would leave in a bucket, without building it (a hot path's arithmetic). */
export function refilledTokens(tokens: number, updatedAt: number, limit: Limit, now: number): number {
  // A clock that went backwards (another worker's, or an NTP step) refills nothing.
  return Math.min(limit.burst, tokens + Math.max(0, now - updatedAt) * limit.rate);
}

/** Same, of a bucket that may be missing (full). */
const tokensAt = (bucket: Bucket | undefined, limit: Limit, now: number): number =>
  bucket === undefined ? limit.burst : refilledTokens(bucket.tokens, bucket.updatedAt, limit, now);

const stampAt = (bucket: Bucket | undefined, now: number): number => (bucket === undefined ? now : Math.max(now, bucket.updatedAt));

const NONE_LIMITED: ReadonlySet<string> = new Set();

/**
 * Charges one event's candidate recipients (those that passed every other
 * check) against `state`, which it updates in place. The sender's bucket is
 * checked for the whole event first: over it, the event is delayed whole and
 * nothing is charged. Otherwise each recipient takes from its client and
 * (sender, client) buckets, and is rate-limited alone if either is empty; the
 * sender's bucket pays only for recipients that got through.
 *
 * The same arithmetic as `take` and `refill`, inlined: this runs for every
 * delivery, and their intermediate objects were a tenth of a worker's
 * allocations. Only the buckets it stores are built.
 */
export function chargeEvent(limits: RateLimits, state: BucketState, sender: string, candidates: readonly string[], now: number): EventCharge {
  if (candidates.length === 0) return { kind: "charged", limited: NONE_LIMITED };
  const senderKey = bucketKey("sender", sender, "");
  const senderLimit = limitFor(limits, "sender", sender, "");
  const senderBucket = state.get(senderKey);
  const senderTokens = tokensAt(senderBucket, senderLimit, now);
  if (senderTokens < candidates.length) {
    const n = candidates.length;
    const waitSeconds = n > senderLimit.burst || senderLimit.rate <= 0 ? Infinity : (n - senderTokens) / senderLimit.rate;
    return { kind: "delay", waitSeconds };
  }

  let limited: Set<string> | undefined;
  let passed = 0;
  for (const cid of candidates) {
    const clientKey = bucketKey("client", sender, cid);
    const pairKey = bucketKey("sender_client", sender, cid);
    const clientLimit = limitFor(limits, "client", sender, cid);
    const pairLimit = limitFor(limits, "sender_client", sender, cid);
    const clientBucket = state.get(clientKey);
    const pairBucket = state.get(pairKey);
    const clientTokens = tokensAt(clientBucket, clientLimit, now);
    const pairTokens = tokensAt(pairBucket, pairLimit, now);
    // A refused delivery costs nothing in either bucket: they keep only the refill.
    const cost = clientTokens >= 1 && pairTokens >= 1 ? 1 : 0;
    state.set(clientKey, { tokens: clientTokens - cost, updatedAt: stampAt(clientBucket, now) });
    state.set(pairKey, { tokens: pairTokens - cost, updatedAt: stampAt(pairBucket, now) });
    if (cost === 1) passed += 1;
    else (limited ??= new Set()).add(cid);
  }
  state.set(senderKey, { tokens: senderTokens - passed, updatedAt: stampAt(senderBucket, now) });
  return { kind: "charged", limited: limited ?? NONE_LIMITED };
}
