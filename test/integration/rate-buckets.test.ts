/**
 * Where the commit keeps rate buckets (src/receive/), at the store
 * level with a fixed clock. The sender's bucket is read without a lock and
 * charged by the commit's last statement: two batches that read it at the same
 * time, when it holds enough for either but not both, must still charge it
 * exactly (the second to commit runs again with the bucket locked). A client's
 * own buckets live in its row, and only those not full again are kept; they
 * too are read without a lock and charged on condition by the last statement.
 */
import { randomBytes } from "node:crypto";
import pg from "pg";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import type { RateLimits } from "../../src/policy/rate-limit.ts";
import { generateSigningJwk, importSigningKey, importVerificationKey, type VerificationKey } from "../../src/protocol/keys.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { commitBatch, type AcceptedInput } from "../../src/receive/commit.ts";
import type { EventOutcome } from "../../src/receive/types.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";

const NOW = 1_800_000_000;
const SENDER = { rate: 0, burst: 100 };

let schema: TestSchema;
let first: Db;
let second: Db;
let key: VerificationKey;
const caps = new Map<string, string>();

beforeEach(async () => {
  schema = testSchema("sender-bucket");
  first = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  second = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  await migrate(first.pool, schema.schema);
  for (let i = 0; i < 120; i++) {
    await registerClient(first, `c${i}`);
    caps.set(`c${i}`, (await issueCapability(first, `c${i}`, "g@alpha", "alpha")).capability);
  }
  key = await importVerificationKey(importSigningKey(await generateSigningJwk("alpha", "k1", NOW - 60)).publicJwk);
});

afterEach(async () => {
  await first?.close();
  await second?.close();
  await schema?.drop();
});

/** Events that commitBatch takes as verified: one recipient each, clients c<from>…c<from+n-1>. */
function events(from: number, n: number, iss = "alpha", capsOf = caps): AcceptedInput[] {
  return Array.from({ length: n }, (_, i) => {
    const cid = `c${from + i}`;
    const claims = { iss, aud: "beta", jti: `${iss}-${from + i}`, iat: NOW, exp: NOW + 3600, grp: `g@${iss}`, rcpt: [{ cid, cap: capsOf.get(cid)! }], body: randomBytes(8).toString("base64url") };
    return { streamSeq: from + i + 1, event: { bytes: Buffer.from(`token-${iss}-${from + i}`), claims, key }, publishedAt: NOW };
  });
}

/** An event to c0 alone, with its own id (a test sends c0 several). */
function toC0(jti: string, streamSeq: number): AcceptedInput {
  const [e] = events(0, 1);
  return { ...e!, streamSeq, event: { ...e!.event, bytes: Buffer.from(`token-${jti}`), claims: { ...e!.event.claims, jti } } };
}

/**
 * A transaction that holds locks the batches under test will need, opened with
 * `sql` (which takes them); `untilBlocked(n)` waits until `n` sessions wait
 * behind it, for its locks or for a session that does, and gives their pids.
 * Read live (pg_locks, pg_blocking_pids), and only behind this gate: other test
 * files wait for locks in the same database at the same time.
 */
async function lockGate(sql: string): Promise<{ untilBlocked(n: number): Promise<number[]>; query(sql: string): Promise<unknown>; release(): Promise<void> }> {
  const gate = new pg.Client({ connectionString: schema.url });
  await gate.connect();
  await gate.query(`BEGIN; ${sql}`);
  let open = true;
  return {
    async untilBlocked(n) {
      for (let i = 0; ; i++) {
        if (i === 500) throw new Error(`never ${n} sessions waiting behind the gate`);
        const { rows } = await gate.query<{ pid: number }>(`
          WITH waiting AS (SELECT DISTINCT pid FROM pg_locks WHERE NOT granted),
               direct AS (SELECT pid FROM waiting WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid)))
          SELECT pid FROM waiting WHERE pid IN (SELECT pid FROM direct) OR pg_blocking_pids(pid) && ARRAY(SELECT pid FROM direct)`);
        if (rows.length >= n) return rows.map((r) => r.pid);
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    query: (more) => gate.query(more),
    async release() {
      if (!open) return;
      open = false;
      try {
        await gate.query("COMMIT");
      } finally {
        await gate.end();
      }
    },
  };
}

/**
 * Two batches committed at once on two connections, each held behind a gate
 * opened with `gateSql` until both wait there, having read the buckets they
 * charge: their outcomes, and how many bucket races were run again. Their key is
 * stored beforehand, so neither waits on the other's insert of it instead.
 */
async function raceBehindGate(gateSql: string, rateLimits: RateLimits, a: AcceptedInput[], b: AcceptedInput[]): Promise<{ outcomes: EventOutcome[]; races: number }> {
  await first.pool.query("INSERT INTO peer_keys (thumbprint, kid, homeserver, jwk) VALUES ($1, $2, 'alpha', $3)", [key.thumbprint, key.kid, JSON.stringify(key.jwk)]);
  const gate = await lockGate(gateSql);
  let races = 0;
  const options = { now: NOW, rateLimits, onBucketRace: () => void (races += 1) };
  const committed = [commitBatch(first, a, [], options), commitBatch(second, b, [], options)];
  try {
    await gate.untilBlocked(2);
  } finally {
    await gate.release();
  }
  return { outcomes: (await Promise.all(committed)).flat(), races };
}

/** A sender bucket smaller than config allows (burst ≥ 1,000): the store takes any limits. */
function limits(): RateLimits {
  return { ...loadConfig({}).rateLimits, servers: { alpha: SENDER }, client: { rate: 0, burst: 1000 }, senderClient: { rate: 0, burst: 1000 } };
}

describe("two batches charging one sender's bucket at once", () => {
  it("store exactly what the bucket holds: the loser of the race runs again locked and delays the rest", async () => {
    // The bucket and the key are stored already (the second batch would otherwise wait on the first's insert of them).
    await first.pool.query("INSERT INTO rate_buckets (key, tokens, updated_at) VALUES ('s:alpha', $1, $2)", [SENDER.burst, NOW]);
    // Hold both transactions after they have read the bucket and decided (deliveries are written after that).
    // Both wait, once both have read the sender's bucket: on the gate, or (if the other charged it first) on the bucket's row.
    const { outcomes, races } = await raceBehindGate(`LOCK TABLE "${schema.schema}".deliveries IN EXCLUSIVE MODE`, limits(), events(0, 60), events(60, 60));

    expect(races).toBe(1);
    expect(outcomes.filter((o) => o.status === "stored")).toHaveLength(100);
    expect(outcomes.filter((o) => o.status === "delayed")).toHaveLength(20);
    const count = async (table: "events" | "deliveries"): Promise<number> =>
      Number((await first.pool.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
    expect(await count("events")).toBe(100);
    expect(await count("deliveries")).toBe(100);
    const bucket = (await first.pool.query<{ tokens: number }>("SELECT tokens FROM rate_buckets WHERE key = 's:alpha'")).rows[0]!;
    expect(bucket.tokens).toBe(0);
  });

  it("charge the bucket by the sum of both when it holds enough for both, with no second run", async () => {
    let races = 0;
    const options = { now: NOW, rateLimits: limits(), onBucketRace: () => void (races += 1) };
    const outcomes = (await Promise.all([commitBatch(first, events(0, 40), [], options), commitBatch(second, events(60, 40), [], options)])).flat();
    expect(races).toBe(0);
    expect(outcomes.every((o) => o.status === "stored")).toBe(true);
    const bucket = (await first.pool.query<{ tokens: number }>("SELECT tokens FROM rate_buckets WHERE key = 's:alpha'")).rows[0]!;
    expect(bucket.tokens).toBe(20);
  });
});

describe("a client's own buckets, in its row", () => {
  const bucketsOf = async (id: string): Promise<unknown> =>
    (await first.pool.query<{ buckets: unknown }>("SELECT buckets FROM clients WHERE id = $1", [id])).rows[0]!.buckets;

  it("hold the all-senders and the per-sender bucket it was charged, and drop them once full again", async () => {
    const rates: RateLimits = { ...limits(), servers: {}, client: { rate: 1, burst: 10 }, senderClient: { rate: 1, burst: 5 } };
    expect(await bucketsOf("c0")).toEqual({});
    await commitBatch(first, events(0, 1), [], { now: NOW, rateLimits: rates });
    expect(await bucketsOf("c0")).toEqual({ "*": [9, NOW], alpha: [4, NOW] });

    // Long after, gamma delivers to c0: alpha's bucket has refilled and is not kept.
    const gammaCaps = new Map([["c0", (await issueCapability(first, "c0", "g@gamma", "gamma")).capability]]);
    const later = NOW + 60;
    await commitBatch(first, events(0, 1, "gamma", gammaCaps), [], { now: later, rateLimits: rates });
    expect(await bucketsOf("c0")).toEqual({ "*": [9, later], gamma: [4, later] });
    // A client nobody delivered to keeps none.
    expect(await bucketsOf("c1")).toEqual({});
  });

  it("charged by two batches that read it at once, hold exactly their burst: the loser runs again locked and is refused what is left over", async () => {
    const rates: RateLimits = { ...limits(), servers: {}, client: { rate: 0, burst: 10 }, senderClient: { rate: 0, burst: 5 } };
    await first.pool.query("INSERT INTO rate_buckets (key, tokens, updated_at) VALUES ('s:alpha', $1, $2)", [rates.sender.burst, NOW]);
    const three = (name: string, seq: number): AcceptedInput[] => [0, 1, 2].map((i) => toC0(`${name}-${i}`, seq + i));
    // Both read c0's buckets (5 left for alpha, enough for either batch of 3) before either may lock its row.
    const { outcomes, races } = await raceBehindGate(`LOCK TABLE "${schema.schema}".clients IN EXCLUSIVE MODE`, rates, three("a", 1000), three("b", 1010));
    expect(races).toBe(1);
    const limited = outcomes.filter((o) => o.status === "stored" && o.decision.refused.some((r) => r.reason === "rate_limited"));
    expect(limited).toHaveLength(1);
    const { rows } = await first.pool.query<{ seq: string }>("SELECT seq FROM deliveries WHERE client_id = 'c0' ORDER BY seq");
    expect(rows.map((r) => Number(r.seq))).toEqual([1, 2, 3, 4, 5]);
    expect(await bucketsOf("c0")).toEqual({ "*": [5, NOW], alpha: [0, NOW] });
  });

  it("stay within what Postgres computes when a limit stored before limits were bounded is huge: charged again after a refill, nothing overflows", async () => {
    const huge: RateLimits = { ...limits(), servers: {}, clients: { c0: { rate: 1e300, burst: 1e300 } } };
    for (const [i, now] of [NOW, NOW + 10, NOW + 20].entries()) {
      expect((await commitBatch(first, [toC0(`huge-${i}`, 500 + i)], [], { now, rateLimits: huge })).map((o) => o.status)).toEqual(["stored"]);
    }
    expect(await bucketsOf("c0")).toEqual({ "*": [1e12 - 1, NOW + 20], alpha: [1e12 - 1, NOW + 20] });
  });

  it("limit a client exactly: the sixth delivery from one sender is refused rate_limited", async () => {
    const rates: RateLimits = { ...limits(), servers: {}, client: { rate: 0, burst: 10 }, senderClient: { rate: 0, burst: 5 } };
    const toOne = Array.from({ length: 7 }, (_, i) => toC0(`one-${i}`, 100 + i));
    const outcomes = await commitBatch(first, toOne, [], { now: NOW, rateLimits: rates });
    const refusedReasons = outcomes.map((o) => (o.status === "stored" ? o.decision.refused.map((r) => r.reason).join() : o.status));
    expect(refusedReasons).toEqual(["", "", "", "", "", "rate_limited", "rate_limited"]);
    expect(await bucketsOf("c0")).toEqual({ "*": [5, NOW], alpha: [0, NOW] });
  });
});

describe("a batch waiting for a client's row", () => {
  it("delivers nothing to a client removed and registered again under its id after the batch read it", async () => {
    const t = (table: string): string => `"${schema.schema}".${table}`;
    const gate = await lockGate(`LOCK TABLE ${t("clients")} IN EXCLUSIVE MODE`);
    try {
      const batch = commitBatch(first, events(0, 1), [], { now: NOW, rateLimits: limits() });
      batch.catch(() => undefined);
      await gate.untilBlocked(1);
      // Meanwhile c0 is removed and registered again (what removeClient and registerClient do).
      await gate.query(`DELETE FROM ${t("clients")} WHERE id = 'c0'; DELETE FROM ${t("deliveries")} WHERE client_id = 'c0';
        INSERT INTO ${t("clients")} (id) VALUES ('c0'); UPDATE ${t("capabilities")} SET revoked_at = now() WHERE client_id = 'c0'`);
      await gate.release();
      expect((await batch).map((o) => o.status)).toEqual(["stored"]);
      const { rows } = await first.pool.query<{ delivery_seq: string }>("SELECT delivery_seq FROM clients WHERE id = 'c0'");
      expect(rows).toEqual([{ delivery_seq: "0" }]);
      expect((await first.pool.query("SELECT 1 FROM deliveries WHERE client_id = 'c0'")).rows).toEqual([]);
    } finally {
      await gate.release();
    }
  });

  it("fails alone when its connection is lost while it waits, and leaves no rejection unhandled", async () => {
    const holder = await lockGate(`SELECT 1 FROM "${schema.schema}".clients WHERE id = 'c0' FOR UPDATE`);
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
    process.on("unhandledRejection", onUnhandled);
    try {
      const batch = commitBatch(first, events(0, 1), [], { now: NOW, rateLimits: limits() });
      batch.catch(() => undefined);
      // The batch has read without a lock, decided, and now waits to lock c0 before its last statement.
      const [pid] = await holder.untilBlocked(1);
      await second.pool.query("SELECT pg_terminate_backend($1)", [pid]);
      await expect(batch).rejects.toThrow();
      await new Promise((r) => setTimeout(r, 100));
      expect(unhandled).toEqual([]);
      // Nothing of it was stored, and the next batch commits on a fresh connection once c0 is free.
      await holder.release();
      expect(await commitBatch(first, events(0, 1), [], { now: NOW, rateLimits: limits() })).toMatchObject([{ status: "stored" }]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
      await holder.release();
    }
  });
});
