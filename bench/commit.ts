/**
 * `npm run bench:commit`: the commit alone (src/receive/), without
 * NATS or verification, to measure what one batch costs the worker and Postgres.
 * Two pools (two workers) commit batches of single-recipient events to 1,000
 * clients in a loop, rate limits on; prints batches/s, mean commit time, and CPU
 * per batch of this process and of all Postgres processes (/proc).
 *
 *   npm run bench:commit [-- --seconds 8 --batch 16 --postgres URL]
 */
import { randomBytes } from "node:crypto";
import { parseArgs } from "node:util";
import pg from "pg";
import { loadConfig } from "../src/config.ts";
import { generateSigningJwk, importSigningKey, importVerificationKey } from "../src/protocol/keys.ts";
import { issueCapability } from "../src/store/capabilities.ts";
import { registerClient } from "../src/store/clients.ts";
import { commitBatch, type AcceptedInput } from "../src/receive/commit.ts";
import { createDb } from "../src/store/db.ts";
import { migrate } from "../src/store/migrate.ts";
import { postgresCpuMeter } from "./fixtures.ts";

const { values: args } = parseArgs({ options: { seconds: { type: "string" }, batch: { type: "string" }, postgres: { type: "string" } } });
const SECONDS = Number(args.seconds ?? 8);
const BATCH = Number(args.batch ?? 16);
if (!(SECONDS > 0) || !Number.isInteger(BATCH) || BATCH < 1) {
  process.stderr.write("bench:commit: --seconds must be positive and --batch a positive integer\n");
  process.exit(2);
}
const url = args.postgres ?? "postgresql://postgres@127.0.0.1:5432/test";
const CLIENTS = 1000;
const schema = `bench_commit_${randomBytes(3).toString("hex")}`;

const dbs = [0, 1].map(() => createDb({ url, schema, poolSize: 4 }));
try {
  await migrate(dbs[0]!.pool, schema);
  const caps: string[] = [];
  for (let i = 0; i < CLIENTS; i++) {
    await registerClient(dbs[0]!, `c${i}`);
    caps.push((await issueCapability(dbs[0]!, `c${i}`, "g@alpha", "alpha")).capability);
  }
  const now = Math.floor(Date.now() / 1000);
  const key = await importVerificationKey(importSigningKey(await generateSigningJwk("alpha", "k1", now - 60)).publicJwk);
  // A token as long as a 1 KiB-body event's; commitBatch stores it as it is.
  const part = randomBytes(700).toString("base64url");
  const rateLimits = { ...loadConfig({}).rateLimits, enabled: true, servers: { alpha: { rate: 1e9, burst: 1e9 } } };
  let next = 0;
  const batch = (): AcceptedInput[] => Array.from({ length: BATCH }, () => {
    const i = next++;
    const cid = `c${i % CLIENTS}`;
    const claims = { iss: "alpha", aud: "bench", jti: `e${i}`, iat: now, exp: now + 3600, grp: "g@alpha", rcpt: [{ cid, cap: caps[i % CLIENTS]! }], body: "" };
    return { streamSeq: i + 1, event: { bytes: Buffer.from(`${part}.${part}.${i}`), claims, key }, publishedAt: now };
  });
  const commit = (db: (typeof dbs)[number]) => commitBatch(db, batch(), [], { now, rateLimits });

  // Warm-up: statements prepared on every connection, the hot path compiled.
  for (let i = 0; i < 50; i++) await Promise.all(dbs.map(commit));
  const postgresSeconds = postgresCpuMeter();
  const selfBefore = process.cpuUsage();
  const start = performance.now();
  let batches = 0;
  let commitMs = 0;
  await Promise.all(dbs.map(async (db) => {
    while (performance.now() - start < SECONDS * 1000) {
      const began = performance.now();
      await commit(db);
      commitMs += performance.now() - began;
      batches += 1;
    }
  }));
  const wall = performance.now() - start;
  const self = process.cpuUsage(selfBefore);
  process.stdout.write(
    `commit, batches of ${BATCH}, 2 pools, ${SECONDS} s: ${((1000 * batches) / wall).toFixed(0)} batches/s, commit ${(commitMs / batches).toFixed(2)} ms; ` +
    `CPU per batch: this process ${((self.user + self.system) / 1000 / batches).toFixed(2)} ms, Postgres ${((1000 * postgresSeconds()) / batches).toFixed(2)} ms\n`,
  );
} finally {
  await Promise.all(dbs.map((db) => db.close()));
  const admin = new pg.Client({ connectionString: url });
  await admin.connect();
  await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await admin.end();
}
