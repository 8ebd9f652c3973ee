/**
 * Every process's view of this homeserver's own keys (src/keys/own-keys.ts),
 * read again every second, so a rotation reaches every process, on any host,
 * with no restart: each serves the new key within a second, and all switch to
 * signing with it at its sign_from.
 */
import type { Logger } from "pino";
import { importSigningKey, type PublicJwk, type SigningKey } from "../protocol/keys.ts";
import type { Db } from "../store/db.ts";
import { ownKeyRows } from "../store/own-keys.ts";
import { servedJwks, signingKeyAt, type OwnKeyRow } from "./own-keys.ts";

export interface OwnKeys {
  /** The key that signs now. */
  signing(): SigningKey | undefined;
  /** Any of our keys, current or retired, by kid: what our own outbox's events are checked with. */
  byKid(kid: string): SigningKey | undefined;
  /** The key set peers are served. */
  served(): readonly PublicJwk[];
  close(): void;
}

export async function watchOwnKeys(db: Db, options: {
  readonly refreshMs: number;
  readonly now: () => number;
  readonly log: Logger;
  /** The served set changed (a rotation): this process's own registry takes it too. */
  readonly onChange: (served: readonly PublicJwk[]) => void;
}): Promise<OwnKeys> {
  const cache = new Map<string, SigningKey>();
  let rows: readonly OwnKeyRow[] = [];
  let served: readonly PublicJwk[] = [];
  let fingerprint = "";
  const take = (next: readonly OwnKeyRow[]): void => {
    const print = JSON.stringify(next.map((r) => [r.kid, r.signFrom, r.retiredAt]));
    if (print === fingerprint) return;
    for (const r of next) if (!cache.has(r.kid)) cache.set(r.kid, importSigningKey(r.privateJwk));
    rows = next;
    served = servedJwks(rows);
    const changed = fingerprint !== "";
    fingerprint = print;
    if (changed) options.onChange(served);
  };
  take(await ownKeyRows(db));
  const timer = setInterval(() => {
    // Postgres away: the keys as last read stay in force (as for policy).
    ownKeyRows(db).then(take).catch((err: unknown) => options.log.warn({ err }, "could not read this homeserver's own keys; keeping those last read"));
  }, options.refreshMs);
  timer.unref();
  return {
    signing() {
      const row = signingKeyAt(rows, options.now());
      return row && cache.get(row.kid);
    },
    byKid: (kid) => cache.get(kid),
    served: () => served,
    close: () => clearInterval(timer),
  };
}
