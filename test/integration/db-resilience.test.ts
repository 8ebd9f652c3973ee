import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import { startTcpProxy, type TcpProxy } from "../helpers/tcp-proxy.ts";

let proxy: TcpProxy;
let schema: TestSchema;
let db: Db;

beforeAll(async () => {
  schema = testSchema("db_resilience");
  proxy = await startTcpProxy({ host: "127.0.0.1", port: 5432 });
  db = createDb({ url: proxy.via(schema.url), schema: schema.schema, poolSize: 2 });
  await migrate(db.pool, schema.schema);
});

afterAll(async () => {
  await db?.close();
  await proxy?.close();
  await schema?.drop();
});

describe("the Postgres handle survives losing its server mid-transaction", () => {
  it("a connection lost between two statements of a transaction fails that transaction only; later work succeeds on fresh connections", async () => {
    let lost: Promise<void> | undefined;
    const failed = await db.kysely.transaction().execute(async (trx) => {
      await sql`SELECT 1`.execute(trx);
      // The server goes away while this transaction holds its connection, between statements.
      proxy.cut();
      lost = new Promise((r) => setTimeout(r, 200));
      await lost;
      await sql`SELECT 2`.execute(trx);
    }).then(() => false, () => true);
    expect(failed).toBe(true);
    proxy.restore();

    // Every later query works: the broken connection was destroyed, not handed out again.
    for (let i = 0; i < 6; i++) {
      const { rows } = await sql<{ n: number }>`SELECT ${i}::int AS n`.execute(db.kysely);
      expect(rows).toEqual([{ n: i }]);
    }
  });
});
