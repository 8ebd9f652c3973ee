/**
 * Plain numbered SQL migrations from migrations/, all pending ones in one
 * transaction under an advisory lock, so workers starting together migrate once.
 */
import { readdir, readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import type { Pool } from "pg";
import { quoteIdent } from "./db.ts";

export const MIGRATIONS_DIR = fileURLToPath(new URL("../../migrations/", import.meta.url));

export interface Migration {
  readonly name: string;
  readonly sql: string;
}

export async function readMigrations(dir = MIGRATIONS_DIR): Promise<Migration[]> {
  const names = (await readdir(dir)).filter((n) => /^\d{3}_[a-z0-9_]+\.sql$/.test(n)).sort();
  return Promise.all(names.map(async (name) => ({ name, sql: await readFile(`${dir}/${name}`, "utf8") })));
}

/** Applies pending migrations to `schema`; returns the names applied. */
export async function migrate(pool: Pool, schema: string, migrations?: readonly Migration[]): Promise<string[]> {
  const all = migrations ?? (await readMigrations());
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    // Lock per schema: homeservers sharing a database migrate independently.
    await client.query("SELECT pg_advisory_xact_lock(hashtext('fedrelay.migrate.' || $1))", [schema]);
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${quoteIdent(schema)}`);
    await client.query(`SET LOCAL search_path TO ${quoteIdent(schema)}`);
    await client.query(
      "CREATE TABLE IF NOT EXISTS migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    );
    const { rows } = await client.query<{ name: string }>("SELECT name FROM migrations");
    const done = new Set(rows.map((r) => r.name));
    const applied: string[] = [];
    for (const m of all) {
      if (done.has(m.name)) continue;
      await client.query(m.sql);
      await client.query("INSERT INTO migrations (name) VALUES ($1)", [m.name]);
      applied.push(m.name);
    }
    await client.query("COMMIT");
    return applied;
  } catch (err) {
    await client.query("ROLLBACK").catch(() => undefined);
    throw err;
  } finally {
    client.release();
  }
}
