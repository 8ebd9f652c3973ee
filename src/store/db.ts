/** The Postgres handle: a pg pool pinned to this homeserver's schema, and kysely over it. */
import { Kysely, PostgresDialect } from "kysely";
import pg from "pg";
import type { Database } from "./schema.ts";

export interface Db {
  readonly pool: pg.Pool;
  readonly kysely: Kysely<Database>;
  readonly schema: string;
  /** A client of the pool for statements sent without kysely (the commit pipelines them); release it when done. */
  connect(): Promise<pg.PoolClient>;
  close(): Promise<void>;
}

export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/** SQLSTATEs after which the same work will succeed if retried later (graphile-worker keeps the same list). */
export const RETRYABLE_SQLSTATES: ReadonlySet<string> = new Set([
  "40001", // serialization_failure
  "40P01", // deadlock_detected
  "57P01", // admin_shutdown
  "57P02", // crash_shutdown
  "57P03", // cannot_connect_now
  "08000", "08003", "08006", "08001", "08004", // connection exceptions
  "53300", // too_many_connections
]);

export function createDb(options: { url: string; schema: string; poolSize: number }): Db {
  const pool = new pg.Pool({
    connectionString: options.url,
    max: options.poolSize,
    // Every connection sees only this homeserver's tables. The commit's statements are prepared,
    // and Postgres (plan_cache_mode auto) keeps generic plans for them after five runs: against
    // planning each batch, they cut its CPU a batch by 16–23 % on 1–64 single-recipient events
    // (npm run bench:commit -- --batch N). No plan there depends on how long a batch's arrays
    // are: their filters join against unnest(), not `= ANY($1)`, which a generic plan can only
    // test row by row (that doubled Postgres's CPU on 1,000-recipient events).
    options: `-c search_path=${quoteIdent(options.schema)}`,
    // A worker must notice a dead server rather than hang on a half-open socket:
    // bounded connects, TCP keepalive after 10 s idle, and no query waits forever
    // (a commit of a large batch takes well under a second).
    connectionTimeoutMillis: 5000,
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
    query_timeout: 60_000,
    // A query is sent without waiting for the one before: the commit sends BEGIN with its first
    // statement and COMMIT with its last (kysely still awaits each of its queries in turn).
    pipeline: true,
  });
  // An idle client losing its server emits here; without a listener Node would crash.
  pool.on("error", () => undefined);
  // A client checked out (inside a transaction) when the server goes away emits
  // "error" between statements: without a listener the process would crash, and
  // returned to the pool as usual it would fail every later batch. Mark it, and
  // have it destroyed on release.
  const broken = new WeakSet<pg.PoolClient>();
  pool.on("connect", (client) => client.on("error", () => broken.add(client as pg.PoolClient)));
  const kyselyPool = {
    async connect(): Promise<pg.PoolClient> {
      const client = await pool.connect();
      const release = client.release.bind(client);
      client.release = (err?: Error | boolean) => release(err ?? (broken.has(client) ? true : undefined));
      return client;
    },
    end: () => pool.end(),
    options: pool.options,
  };
  const kysely = new Kysely<Database>({ dialect: new PostgresDialect({ pool: kyselyPool }) });
  let closing: Promise<void> | undefined;
  return {
    pool,
    kysely,
    schema: options.schema,
    connect: () => kyselyPool.connect(),
    close() {
      // kysely ends the pool only if it ever used it; plain pool users (migrate) need the second step.
      closing ??= kysely.destroy().then(() => (pool.ended ? undefined : pool.end()));
      return closing;
    },
  };
}
