/** Each test gets its own schema in the `test` database: tests run in parallel and repeat. */
import { randomBytes } from "node:crypto";
import pg from "pg";

export const TEST_DATABASE_URL = process.env.FEDRELAY_TEST_DATABASE_URL ?? "postgresql://postgres@127.0.0.1:5432/test";

export interface TestSchema {
  readonly url: string;
  readonly schema: string;
  drop(): Promise<void>;
}

/** A schema name that says which test made it, unique per run. */
export function testSchema(label: string): TestSchema {
  const schema = `t_${label.toLowerCase().replace(/[^a-z0-9]+/g, "_").slice(0, 40)}_${randomBytes(4).toString("hex")}`;
  return {
    url: TEST_DATABASE_URL,
    schema,
    async drop() {
      const client = new pg.Client({ connectionString: TEST_DATABASE_URL });
      await client.connect();
      try {
        await client.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      } finally {
        await client.end();
      }
    },
  };
}
