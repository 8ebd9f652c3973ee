/**
 * Who federates with us and with which keys: inline JWKs from config, or a
 * peer's JWKS URL, fetched on first use and refetched on an unknown kid (so a
 * peer can rotate without us restarting), at most once per cooldown per peer.
 */
import type { Logger } from "pino";
import { importVerificationKey, type PublicJwk, type VerificationKey } from "../protocol/keys.ts";
import { splitKid } from "../protocol/names.ts";
import type { KeyResolver } from "../protocol/verify.ts";

export interface PeerSource {
  readonly keys?: readonly unknown[] | undefined;
  readonly jwksUrl?: string | undefined;
}

export interface KeyRegistryOptions {
  /** This homeserver's own public keys: it may deliver to itself. */
  readonly self: { readonly homeserver: string; readonly keys: readonly PublicJwk[] };
  readonly peers: Readonly<Record<string, PeerSource>>;
  readonly cooldownSeconds: number;
  readonly fetch?: typeof fetch;
  readonly now?: () => number;
  readonly log?: Logger;
}

export interface KeyRegistry extends KeyResolver {
  /** Loads inline keys; failures here are configuration errors. */
  readonly ready: Promise<void>;
}

interface Peer {
  readonly url: string | undefined;
  readonly keys: Map<string, VerificationKey>;
  lastFetch: number;
  inflight: Promise<void> | undefined;
}

/** Keeps only keys whose kid names `homeserver`: a peer's JWKS can never speak for another homeserver. */
async function importOwnKeys(homeserver: string, jwks: readonly unknown[], into: Map<string, VerificationKey>): Promise<void> {
  for (const jwk of jwks) {
    const key = await importVerificationKey(jwk);
    if (key.homeserver === homeserver) into.set(key.kid, key);
  }
}

export function createKeyRegistry(options: KeyRegistryOptions): KeyRegistry {
  const fetchImpl = options.fetch ?? fetch;
  const now = options.now ?? (() => Date.now() / 1000);
  const peers = new Map<string, Peer>();
  for (const [name, source] of Object.entries(options.peers)) {
    peers.set(name, { url: source.jwksUrl, keys: new Map(), lastFetch: -Infinity, inflight: undefined });
  }
  if (!peers.has(options.self.homeserver)) {
    peers.set(options.self.homeserver, { url: undefined, keys: new Map(), lastFetch: -Infinity, inflight: undefined });
  }

  const ready = (async () => {
    await importOwnKeys(options.self.homeserver, options.self.keys, peers.get(options.self.homeserver)!.keys);
    for (const [name, source] of Object.entries(options.peers)) {
      if (source.keys) await importOwnKeys(name, source.keys, peers.get(name)!.keys);
    }
  })();

  async function refresh(name: string, peer: Peer): Promise<void> {
    if (!peer.url || now() - peer.lastFetch < options.cooldownSeconds) return;
    peer.lastFetch = now();
    try {
      const res = await fetchImpl(peer.url, { signal: AbortSignal.timeout(5000) });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const body = (await res.json()) as { keys?: unknown };
      if (!Array.isArray(body.keys)) throw new Error("no keys array");
      // Keys are only ever added: a retired key stays usable for the events it signed.
      await importOwnKeys(name, body.keys, peer.keys);
    } catch (err) {
      options.log?.warn({ peer: name, url: peer.url, err: (err as Error).message }, "JWKS fetch failed");
    }
  }

  return {
    ready,
    isKnown: (homeserver) => peers.has(homeserver),
    async resolve(kid) {
      await ready;
      const parts = splitKid(kid);
      const peer = parts && peers.get(parts.homeserver);
      if (!parts || !peer) return undefined;
      const known = peer.keys.get(kid);
      if (known) return known;
      peer.inflight ??= refresh(parts.homeserver, peer).finally(() => (peer.inflight = undefined));
      await peer.inflight;
      return peer.keys.get(kid);
    },
  };
}
