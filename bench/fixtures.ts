/** Set-up shared by bench, chaos and soak: a fresh destination ready to receive alpha's events. */
import type { JetStreamManager } from "@nats-io/jetstream";
import type pg from "pg";
import type { RelayConfig } from "../src/config.ts";
import { capabilityHash } from "../src/policy/capabilities.ts";
import { inboxStreamName } from "../src/protocol/subjects.ts";
import { createDb, quoteIdent } from "../src/store/db.ts";
import { migrate } from "../src/store/migrate.ts";
import { ensureInbox } from "../src/transport/streams.ts";

/**
 * Drops and re-creates the homeserver's schema and inbox stream, with clients
 * `c0…c<n-1>`, each holding the capability `caps[i]` for group `g@alpha`.
 */
export async function freshDestination(admin: pg.Pool, jsm: JetStreamManager, config: RelayConfig, caps: readonly string[]): Promise<void> {
  const schema = config.postgres.schema;
  await admin.query(`DROP SCHEMA IF EXISTS ${quoteIdent(schema)} CASCADE`);
  await jsm.streams.delete(inboxStreamName(config.homeserver)).catch(() => undefined);
  const db = createDb(config.postgres);
  try {
    await migrate(db.pool, schema);
    const ids = caps.map((_, c) => `c${c}`);
    await db.pool.query("INSERT INTO clients (id) SELECT unnest($1::text[])", [ids]);
    await db.pool.query(
      "INSERT INTO capabilities (id, hash, client_id, grp, owner) SELECT 'cap' || c, h, c, 'g@alpha', 'alpha' FROM unnest($1::text[], $2::bytea[]) AS t(c, h)",
      [ids, caps.map((c) => capabilityHash(c))],
    );
  } finally {
    await db.close();
  }
  await ensureInbox(jsm, config.homeserver, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker);
}
