/**
 * Who federates with us and with which keys: inline JWKs from config, or a
 * peer's JWKS URL, fetched in the background on an unknown kid (so a peer can
 * rotate without us restarting), at most once per cooldown per peer.
 *
 * A lookup never waits for a fetch: an event whose key is not known yet waits
 * itself (its message goes back to JetStream for a while) and the batch goes on
 * with everyone else's. Only a fetch that succeeded, started after the event
 * reached our inbox, and lacks the key makes it `unknown_key`: a peer whose
 * JWKS endpoint is down, slow or hanging loses nothing, and delays no one else.
 * Measured before (a fetch awaited inside the batch): a hanging endpoint raised
 * other senders' commit lag to p50 1.1 s, max 3.2 s; a failed fetch refused the
 * event for good.
 */
import type { Logger } from "pino";
import { RelayError } from "../errors.ts";
import { checkPeerJwk, retiredKey, verificationKeyOf, type PublicJwk, type VerificationKey } from "../protocol/keys.ts";
import { splitKid } from "../protocol/names.ts";
import type { KeyLookup, KeyResolver } from "../protocol/verify.ts";
import { DEFAULT_KEY_SET_LIMITS, parseKeySet, planKeySet, type KeySetLimits, type RefusedKey } from "./key-set.ts";

export interface PeerSource {
  readonly keys?: readonly unknown[] | undefined;
  readonly jwksUrl?: string | undefined;
}

export interface JwksSettings extends KeySetLimits {
  /** Between two fetches of one peer's set: forged kids cannot turn us into a request amplifier. */
  readonly refreshCooldownSeconds: number;
  readonly timeoutMs: number;
  /** An event waits this long for its key at most (a peer whose endpoint stays down); then `unknown_key`. */
  readonly maxWaitSeconds: number;
  /** Every peer's set is fetched this often as well, so a retirement is learned without waiting for a new kid. */
  readonly refreshIntervalSeconds: number;
  /**
   * A retired key verifies only events received before its `exp`, or before we
   * learned of it if later, plus this grace (events on their way at the
   * rotation): a key that leaks after its retirement is useless, whatever `iat`
   * its forger writes. Before: accepted up to 7 days after retirement (an `iat`
   * back-dated into the key's window, with the longest lifetime).
   */
  readonly retiredGraceSeconds: number;
  /** Revocations are read again this often. */
  readonly revocationRefreshMs: number;
}

export const DEFAULT_JWKS_SETTINGS: JwksSettings = {
  ...DEFAULT_KEY_SET_LIMITS, refreshCooldownSeconds: 60, timeoutMs: 5000, maxWaitSeconds: 3600, refreshIntervalSeconds: 300, retiredGraceSeconds: 900, revocationRefreshMs: 1000,
};

/** A key bound to a kid in the key history. */
export interface StoredKey {
  readonly kid: string;
  readonly thumbprint: string;
  readonly jwk: unknown;
  /** When this homeserver learned the key was retired (it had an `exp`), in seconds; null if it has none. */
  readonly retiredAt: number | null;
}

/**
 * The key history (src/store/peer-keys.ts): what binds a kid to its key across
 * processes and restarts. Without one (tests of the registry alone), a binding
 * lasts as long as the registry.
 */
export interface KeyStore {
  bound(homeservers: readonly string[]): Promise<readonly StoredKey[]>;
  /** Binds the keys whose kids are free; returns what each of their kids is bound to now. Marks `seen` (thumbprints) as seen. */
  bind(keys: readonly VerificationKey[], seen: readonly string[]): Promise<ReadonlyMap<string, StoredKey>>;
  /** Keys given an `exp` (or an earlier one): their JWK as now held, and when we learned it. */
  retire(keys: readonly VerificationKey[]): Promise<void>;
  /**
   * What other processes (and operators) changed: keys revoked (`fedrelay keys
   * revoke-peer`), by kid, when, in seconds; and keys retired as the history holds
   * them (another process may have learned the retirement), by kid.
   */
  changes(): Promise<KeyChanges>;
}

export interface KeyChanges {
  readonly revoked: ReadonlyMap<string, number>;
  readonly retired: ReadonlyMap<string, { readonly exp: number; readonly retiredAt: number }>;
}

export interface KeyRegistryOptions {
  /** This homeserver's own public keys: it may deliver to itself. */
  readonly self: { readonly homeserver: string; readonly keys: readonly PublicJwk[] };
  readonly peers: Readonly<Record<string, PeerSource>>;
  readonly jwks?: Partial<JwksSettings>;
  readonly store?: KeyStore;
  readonly fetch?: typeof fetch;
  /** Seconds since the epoch, of the same clock as the `receivedAt` of lookups (the inbox's timestamps). */
  readonly now?: () => number;
  readonly log?: Logger;
  /** A key of a peer's set was not taken (counted by peer and reason). */
  readonly onKeyRefused?: (peer: string, refused: RefusedKey) => void;
  /** A fetch of a peer's set failed (counted by peer). */
  readonly onFetchFailed?: (peer: string) => void;
}

export interface KeyRegistry extends KeyResolver {
  /** Loads inline keys; a refused inline key is a configuration error. */
  readonly ready: Promise<void>;
  /** Stops the periodic fetches. */
  close(): void;
  /** This homeserver's own key set, changed by a rotation: taken as a peer's fetched set is. */
  refreshOwn(keys: readonly PublicJwk[]): Promise<void>;
}

interface Peer {
  readonly name: string;
  readonly url: string | undefined;
  readonly keys: Map<string, VerificationKey>;
  /** When the last fetch began, for the cooldown. */
  lastAttempt: number;
  /** When the last fetch that succeeded began: an event received before it and not in it is `unknown_key`. */
  lastSuccess: number;
  lastError: string | undefined;
  /** Why keys of the last set fetched were not taken, by kid: the detail of an event's refusal. */
  refused: Map<string, RefusedKey>;
  /** When we learned that a key is retired (it has an `exp`), by kid, in seconds. */
  readonly retiredAt: Map<string, number>;
  inflight: Promise<void> | undefined;
}

/** A first look soon after a fetch starts (most answer in milliseconds), then no sooner than the cooldown allows. */
const FIRST_RETRY_MS = 500;
/**
 * A fetch's start (this host's clock) and an event's arrival (the NATS server's) are
 * compared with this margin: a fetch counts as begun after an event only if it began
 * this much later, so a fast clock here never refuses an event that should wait.
 */
const CLOCK_SKEW_SECONDS = 5;
/** How long an event naming an own kid this process does not hold yet waits for the own-keys poll (1 s). */
const SELF_WAIT_SECONDS = 10;

export function createKeyRegistry(options: KeyRegistryOptions): KeyRegistry {
  const settings: JwksSettings = { ...DEFAULT_JWKS_SETTINGS, ...options.jwks };
  const fetchImpl = options.fetch ?? fetch;
  const now = options.now ?? (() => Date.now() / 1000);
  const peers = new Map<string, Peer>();
  const peerOf = (name: string, url: string | undefined): Peer => ({
    name, url, keys: new Map(), lastAttempt: -Infinity, lastSuccess: -Infinity, lastError: undefined, refused: new Map(), retiredAt: new Map(), inflight: undefined,
  });
  for (const [name, source] of Object.entries(options.peers)) peers.set(name, peerOf(name, source.jwksUrl));
  if (!peers.has(options.self.homeserver)) peers.set(options.self.homeserver, peerOf(options.self.homeserver, undefined));

  /** A key the history binds: held from now on (one that no longer passes the checks, bound before them, is not). */
  function adopt(peer: Peer, stored: StoredKey): void {
    const checked = checkPeerJwk(stored.jwk);
    if (checked.ok && checked.homeserver === peer.name) {
      peer.keys.set(stored.kid, verificationKeyOf(checked));
      if (checked.jwk.exp !== undefined) peer.retiredAt.set(stored.kid, stored.retiredAt ?? now());
    } else options.log?.warn({ peer: peer.name, kid: stored.kid }, "a key bound in the key history no longer passes the checks; it verifies nothing");
  }

  /** Takes what `jwks` adds to `peer`, each key bound in the history before it is used; `strict`: any refusal throws (configuration). */
  async function take(peer: Peer, jwks: readonly unknown[], strict: boolean): Promise<void> {
    const known = new Map([...peer.keys].map(([kid, key]) => [kid, { thumbprint: key.thumbprint, nbf: key.validFrom, exp: key.validUntil }]));
    const plan = planKeySet(peer.name, jwks, known);
    const refused = [...plan.refused];
    let add = plan.add.map(verificationKeyOf);
    if (options.store) {
      const bound = await options.store.bind(add, plan.seen);
      add = add.filter((key) => {
        const stored = bound.get(key.kid);
        if (stored === undefined) {
          // Not bound: its thumbprint is already in the history under another kid.
          refused.push({ kid: key.kid, reason: "reused_key", detail: `key ${key.thumbprint} is already bound to another kid in the key history` });
          return false;
        }
        if (stored.thumbprint === key.thumbprint) {
          // Bound by another process first, perhaps already retired there: the history's window holds.
          if ((stored.jwk as { exp?: unknown }).exp !== undefined) {
            adopt(peer, stored);
            return false;
          }
          return true;
        }
        refused.push({
          kid: key.kid, reason: "rebound_kid",
          detail: `${key.kid} is bound to key ${stored.thumbprint} in the key history; the set serves ${key.thumbprint} under it`,
        });
        adopt(peer, stored);
        return false;
      });
    }
    if (strict && refused.length > 0) {
      const r = refused[0]!;
      throw new RelayError("config_invalid", `key ${r.kid ?? "(no kid)"} of ${peer.name} refused (${r.reason}): ${r.detail}`);
    }
    for (const key of add) {
      peer.keys.set(key.kid, key);
      if (key.validUntil !== undefined) peer.retiredAt.set(key.kid, now());
    }
    const retired = plan.retire.map(({ kid, exp }) => retiredKey(peer.keys.get(kid)!, exp));
    await options.store?.retire(retired);
    for (const key of retired) {
      peer.keys.set(key.kid, key);
      if (!peer.retiredAt.has(key.kid)) peer.retiredAt.set(key.kid, now());
      options.log?.info({ peer: peer.name, kid: key.kid, exp: key.validUntil }, "a peer retired a key");
    }
    peer.refused = new Map();
    for (const r of refused) {
      if (r.kid !== undefined) peer.refused.set(r.kid, r);
      options.onKeyRefused?.(peer.name, r);
      const level = r.reason === "rebound_kid" ? "error" : "warn";
      options.log?.[level]({ peer: peer.name, kid: r.kid, reason: r.reason, detail: r.detail }, "a key of a peer's set was not taken");
    }
  }

  const ready = (async () => {
    for (const stored of (await options.store?.bound([...peers.keys()])) ?? []) {
      const peer = peers.get(stored.kid.slice(0, stored.kid.indexOf("#")));
      if (peer) adopt(peer, stored);
    }
    await take(peers.get(options.self.homeserver)!, options.self.keys, true);
    for (const [name, source] of Object.entries(options.peers)) {
      if (source.keys) await take(peers.get(name)!, source.keys, true);
    }
  })();

  async function fetchKeySet(url: string): Promise<readonly unknown[]> {
    const res = await fetchImpl(url, { signal: AbortSignal.timeout(settings.timeoutMs), redirect: "error", headers: { accept: "application/json" } });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const declared = Number(res.headers.get("content-length") ?? NaN);
    if (declared > settings.maxBytes) throw new Error(`the key set is ${declared} bytes, over ${settings.maxBytes}`);
    const text = await readCapped(res, settings.maxBytes);
    const parsed = parseKeySet(text, settings);
    if (!parsed.ok) throw new Error(parsed.detail);
    return parsed.keys;
  }

  async function refresh(peer: Peer): Promise<void> {
    const started = now();
    peer.lastAttempt = started;
    try {
      await take(peer, await fetchKeySet(peer.url!), false);
      peer.lastSuccess = started;
      peer.lastError = undefined;
    } catch (err) {
      peer.lastError = (err as Error).message;
      options.onFetchFailed?.(peer.name);
      options.log?.warn({ peer: peer.name, url: peer.url, err: peer.lastError }, "JWKS fetch failed");
    }
  }

  /** Starts a fetch unless one runs or the cooldown holds; returns when to look again (seconds): soon while one runs. */
  function kick(peer: Peer): number {
    const next = peer.lastAttempt + settings.refreshCooldownSeconds;
    if (!peer.inflight && now() >= next) peer.inflight = refresh(peer).finally(() => (peer.inflight = undefined));
    return peer.inflight ? now() : next;
  }

  // The periodic fetch: a peer's retirement is learned within this interval, not at its next new kid.
  const timer = setInterval(() => {
    for (const peer of peers.values()) if (peer.url) kick(peer);
  }, settings.refreshIntervalSeconds * 1000);
  timer.unref();

  // Revocations, and retirements another process learned, reach every process within a second, as
  // policy does; Postgres away, the last read stands.
  let revoked: ReadonlyMap<string, number> = new Map();
  const readChanges = async (): Promise<void> => {
    if (!options.store) return;
    const changes = await options.store.changes();
    revoked = changes.revoked;
    for (const [kid, { exp, retiredAt }] of changes.retired) {
      const peer = peers.get(kid.slice(0, kid.indexOf("#")));
      const key = peer?.keys.get(kid);
      if (!peer || !key || (key.validUntil !== undefined && key.validUntil <= exp)) continue;
      peer.keys.set(kid, retiredKey(key, exp));
      peer.retiredAt.set(kid, Math.min(retiredAt, peer.retiredAt.get(kid) ?? Infinity));
    }
  };
  const changesTimer = setInterval(() => {
    readChanges().catch((err: unknown) => options.log?.warn({ err }, "could not read revoked and retired peer keys; keeping those last read"));
  }, settings.revocationRefreshMs);
  changesTimer.unref();
  const loaded = (async () => {
    await ready;
    await readChanges();
  })();

  return {
    ready: loaded,
    close: () => {
      clearInterval(timer);
      clearInterval(changesTimer);
    },
    refreshOwn: (keys) => take(peers.get(options.self.homeserver)!, keys, false),
    isKnown: (homeserver) => peers.has(homeserver),
    lookup(kid, receivedAt): KeyLookup {
      const parts = splitKid(kid);
      const peer = parts && peers.get(parts.homeserver);
      if (!parts || !peer) return { status: "unknown", detail: `no key ${kid}` };
      const known = peer.keys.get(kid);
      const revokedAt = revoked.get(kid);
      if (known && revokedAt !== undefined) {
        // A compromised key: nothing signed with it counts from now on, whenever it arrived.
        return { status: "unknown", detail: `key ${kid} was revoked by this homeserver's operator at ${new Date(revokedAt * 1000).toISOString()}` };
      }
      if (known) {
        const retiredAt = peer.retiredAt.get(kid);
        if (known.validUntil !== undefined && retiredAt !== undefined) {
          const until = Math.max(known.validUntil, retiredAt) + settings.retiredGraceSeconds;
          if (receivedAt > until) return { status: "unknown", detail: `key ${kid} is retired: it verifies only events received before ${new Date(until * 1000).toISOString()}` };
        }
        return { status: "found", key: known };
      }
      const refused = peer.refused.get(kid);
      const why = refused ? `: ${peer.name}'s key ${kid} was refused (${refused.reason}): ${refused.detail}` : "";
      // Our own key made by a rotation elsewhere: this process reads it within a second.
      if (peer.name === options.self.homeserver && now() - receivedAt < SELF_WAIT_SECONDS) return { status: "wait", retryMs: 1000, detail: `waiting for this homeserver's key ${kid}` };
      if (!peer.url) return { status: "unknown", detail: `no key ${kid}${why}` };
      if (peer.lastSuccess - CLOCK_SKEW_SECONDS >= receivedAt) return { status: "unknown", detail: `no key ${kid} in ${peer.name}'s key set${why}` };
      if (now() - receivedAt > settings.maxWaitSeconds) {
        return { status: "unknown", detail: `no key ${kid}: ${peer.name}'s key set could not be fetched for ${settings.maxWaitSeconds} s (${peer.lastError ?? "no answer"})` };
      }
      const next = kick(peer);
      const retryMs = Math.max(FIRST_RETRY_MS, Math.ceil((next - now()) * 1000));
      return { status: "wait", retryMs, detail: `waiting for ${peer.name}'s key set${peer.lastError ? ` (last fetch: ${peer.lastError})` : ""}` };
    },
  };
}

/** The body as text, refusing (and ceasing to read) past `maxBytes`: a peer cannot make us buffer more. */
async function readCapped(res: Response, maxBytes: number): Promise<string> {
  if (!res.body) return "";
  const chunks: Uint8Array[] = [];
  let bytes = 0;
  const reader = res.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes += value.byteLength;
    if (bytes > maxBytes) {
      await reader.cancel();
      throw new Error(`the key set is over ${maxBytes} bytes`);
    }
    chunks.push(value);
  }
  return new TextDecoder("utf-8", { fatal: true }).decode(Buffer.concat(chunks));
}

