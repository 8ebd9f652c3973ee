/**
 * The nkeys of a federation: a homeserver's public key from the federation
 * file when its operator keeps the seed, else a pair made once and kept (a
 * second run of nats-config reads the seeds it wrote before and keeps them).
 */
import { createUser, fromSeed } from "@nats-io/nkeys";
import { RelayError } from "../errors.ts";
import type { Federation } from "./federation.ts";
import type { FederationKeys, Nkey } from "./nats-config.ts";

const decoder = new TextDecoder();

function fromExisting(seed: string, what: string): Nkey {
  try {
    const pair = fromSeed(new TextEncoder().encode(seed.trim()));
    return { publicKey: pair.getPublicKey(), seed: seed.trim() };
  } catch (cause) {
    throw new RelayError("config_invalid", `${what} is not an nkey seed`, { cause });
  }
}

function fresh(): Nkey {
  const pair = createUser();
  return { publicKey: pair.getPublicKey(), seed: decoder.decode(pair.getSeed()) };
}

/** `existing`: seeds written by an earlier run, by homeserver (and the admin's). */
export function federationKeys(fed: Federation, existing: { admin?: string; homeservers: ReadonlyMap<string, string> }): FederationKeys {
  const admin: Nkey = fed.hub.adminNkey !== undefined ? { publicKey: fed.hub.adminNkey }
    : existing.admin !== undefined ? fromExisting(existing.admin, "hub/admin.seed") : fresh();
  const homeservers = new Map<string, Nkey>();
  for (const [name, hs] of Object.entries(fed.homeservers)) {
    const seed = existing.homeservers.get(name);
    homeservers.set(name, hs.nkey !== undefined ? { publicKey: hs.nkey }
      : seed !== undefined ? fromExisting(seed, `homeservers/${name}/nkey.seed`) : fresh());
  }
  return { admin, homeservers };
}

/** The public key of a seed (the admin's, for nats-provision). */
export function seedPublicKey(seed: string): string {
  return fromExisting(seed, "the seed").publicKey;
}
