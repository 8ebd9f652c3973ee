/**
 * A peer's storage is bounded by what this homeserver's clients receive
 * (migrations/011): an event nobody here receives keeps a record (its hash,
 * size and refusals), not its body nor a row per refused recipient; its report,
 * a duplicate's report and the dedupe stay exact; and what was refused is
 * deleted after retention.refusedSeconds, never before its event has expired.
 */
import { createHash, randomBytes } from "node:crypto";
import { sql } from "kysely";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { generateSigningJwk, importSigningKey, importVerificationKey, type SigningKey, type VerificationKey } from "../../src/protocol/keys.ts";
import { signEvent } from "../../src/protocol/sign.ts";
import { commitBatch, type AcceptedInput, type RefusedInput } from "../../src/receive/commit.ts";
import { storedDecisions } from "../../src/reports.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { pruneRefused } from "../../src/store/retention.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";

const NOW = Math.floor(Date.now() / 1000);

let schema: TestSchema;
let db: Db;
let signing: SigningKey;
let key: VerificationKey;
let bobCap: string;
let streamSeq = 0;

beforeEach(async () => {
  schema = testSchema("storage-bound");
  db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  await migrate(db.pool, schema.schema);
  await registerClient(db, "bob");
  bobCap = (await issueCapability(db, "bob", "g@alpha", "alpha")).capability;
  signing = importSigningKey(await generateSigningJwk("alpha", "k1", NOW - 60));
  key = await importVerificationKey(signing.publicJwk);
});

afterEach(async () => {
  await db?.close();
  await schema?.drop();
});

/** A signed event as the commit takes it once verified. */
async function signed(jti: string, rcpt: { cid: string; cap?: string }[], bodyBytes: number): Promise<{ input: AcceptedInput; token: string }> {
  const claims = { iss: "alpha", aud: "beta", jti, iat: NOW, exp: NOW + 3600, grp: "g@alpha", rcpt, body: randomBytes(bodyBytes).toString("base64url") };
  const token = await signEvent(claims, signing);
  return { token, input: { streamSeq: ++streamSeq, event: { bytes: Buffer.from(token, "latin1"), claims, key }, publishedAt: NOW } as AcceptedInput };
}

const ghosts = (n: number) => Array.from({ length: n }, (_, i) => ({ cid: `ghost-${String(i).padStart(4, "0")}`, cap: randomBytes(32).toString("base64url") }));

/** What an event occupies in the live rows: its events row (token and record included) and its refusal rows. */
async function storedBytes(jti: string): Promise<number> {
  const { rows } = await sql<{ n: number }>`
    SELECT (SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM events AS e WHERE jti = ${jti})
         + (SELECT coalesce(sum(pg_column_size(r.*)), 0) FROM recipient_refusals AS r WHERE jti = ${jti}) AS n`.execute(db.kysely);
  return Number(rows[0]!.n);
}

describe("an event nobody here receives", () => {
  it("is kept as a record a small fraction of the size of the same event kept with its body, and its reports stay exact", async () => {
    // The measurement from the issue: 1,000 recipients this homeserver does not have, and a body.
    const delivered = await signed("delivered", [{ cid: "bob", cap: bobCap }, ...ghosts(999)], 48 * 1024);
    const nobody = await signed("nobody", ghosts(1000), 48 * 1024);
    expect(await commitBatch(db, [delivered.input], [], { now: NOW })).toMatchObject([{ status: "stored" }]);
    expect(await commitBatch(db, [nobody.input], [], { now: NOW })).toMatchObject([{ status: "stored", decision: { accepted: [] } }]);

    const withBody = await storedBytes("delivered");
    const record = await storedBytes("nobody");
    // Printed for the issue's figures (vitest shows it with --reporter=verbose).
    console.log(`1,000 recipients, 48 KiB body, ${nobody.token.length}-byte token: kept with its body ${withBody} bytes, as a record ${record} bytes`);
    expect(withBody).toBeGreaterThan(nobody.token.length);
    expect(record).toBeLessThan(withBody / 10);

    const row = await db.kysely.selectFrom("events").select(["token", "token_sha256", "token_bytes", "refused"]).where("jti", "=", "nobody").executeTakeFirstOrThrow();
    expect(row.token).toBeNull();
    expect(row.token_sha256?.toString("hex")).toBe(createHash("sha256").update(nobody.token, "latin1").digest("hex"));
    expect(row.token_bytes).toBe(nobody.token.length);
    expect(row.refused).toHaveLength(1000);
    expect(await db.kysely.selectFrom("recipient_refusals").select("client_id").where("jti", "=", "nobody").execute()).toEqual([]);
    const audit = await db.kysely.selectFrom("all_recipient_refusals").select(["client_id", "reason"]).where("jti", "=", "nobody").execute();
    expect(audit).toHaveLength(1000);
    expect(new Set(audit.map((r) => r.reason))).toEqual(new Set(["capability_mismatch"]));

    // The reports, as the report loop builds them, in recipient order.
    const [forDelivered, forNobody] = await storedDecisions(db, [{ iss: "alpha", jti: "delivered" }, { iss: "alpha", jti: "nobody" }])
      .then((items) => ["delivered", "nobody"].map((jti) => items.find((i) => i.ref === jti)!));
    expect(forDelivered!.accepted).toEqual(["bob"]);
    expect(forDelivered!.refused).toHaveLength(999);
    expect(forNobody).toEqual({ sender: "alpha", ref: "nobody", accepted: [], refused: nobody.input.event.claims.rcpt.map((r) => ({ cid: r.cid, reason: "capability_mismatch" })) });

    // Sent again (a redelivery, a retried publish): a duplicate, reported as first decided, stored once.
    expect(await commitBatch(db, [{ ...nobody.input, streamSeq: ++streamSeq }], [], { now: NOW, queueReports: true })).toMatchObject([{ status: "duplicate" }]);
    expect(await db.kysely.selectFrom("report_queue").select("jti").execute()).toEqual([{ jti: "nobody" }]);
    expect(await storedDecisions(db, [{ iss: "alpha", jti: "nobody" }])).toEqual([forNobody]);
    const { rows } = await sql<{ n: string }>`SELECT count(*) AS n FROM events WHERE jti = 'nobody'`.execute(db.kysely);
    expect(rows[0]!.n).toBe("1");
  });

  it("is a record while its recipient is not registered; events to that recipient once registered keep their body", async () => {
    const first = await signed("first", [{ cid: "carol" }], 1024);
    await commitBatch(db, [first.input], [], { now: NOW });
    await registerClient(db, "carol");
    const carolCap = (await issueCapability(db, "carol", "g@alpha", "alpha")).capability;
    const second = await signed("second", [{ cid: "carol", cap: carolCap }], 1024);
    await commitBatch(db, [second.input], [], { now: NOW });
    const rows = await db.kysely.selectFrom("events").select(["jti", "token"]).orderBy("jti").execute();
    expect(rows).toEqual([{ jti: "first", token: null }, { jti: "second", token: second.token }]);
  });
});

describe("records beside everything else one commit writes", () => {
  it("keeps deliveries, records, a delayed event taken back and one refused rate_limited after its longest delay apart, in one statement", async () => {
    // alpha's own bucket holds 2 deliveries and refills after the test: a third event waits, or is refused once it waited too long.
    const limits = {
      enabled: true, client: { rate: 100, burst: 100 }, sender: { rate: 100, burst: 100 }, senderClient: { rate: 100, burst: 100 },
      servers: { alpha: { rate: 0.0001, burst: 2 } }, clients: {}, maxDelaySeconds: 300,
    };
    const toBob = [{ cid: "bob", cap: bobCap }];
    const [delivered1, nobody, delivered2] = await Promise.all([signed("a1", toBob, 64), signed("a2", [{ cid: "ghost" }], 64), signed("a3", toBob, 64)]);
    const delayed = await signed("a4", toBob, 64);
    const waitedTooLong = await signed("a5", toBob, 64);
    const outcomes = await commitBatch(db, [delivered1.input, nobody.input, delivered2.input, delayed.input, { ...waitedTooLong.input, publishedAt: NOW - 10_000 }], [],
      { now: NOW, rateLimits: limits, queueReports: true });
    expect(outcomes.map((o) => o.status)).toEqual(["stored", "stored", "stored", "delayed", "stored"]);
    const rows = await db.kysely.selectFrom("events").select(["jti", "token", "refused"]).orderBy("jti").execute();
    expect(rows.map((r) => [r.jti, r.token === null, r.refused])).toEqual([
      ["a1", false, null], ["a2", true, [["ghost", "no_capability"]]], ["a3", false, null], ["a5", true, [["bob", "rate_limited"]]],
    ]);
    expect((await db.kysely.selectFrom("deliveries").select("jti").orderBy("jti").execute()).map((d) => d.jti)).toEqual(["a1", "a3"]);
    // The delayed event, back once the bucket has refilled: decided then, and delivered.
    const again = await commitBatch(db, [{ ...delayed.input, streamSeq: ++streamSeq }], [], { now: NOW + 100_000, rateLimits: limits });
    expect(again).toMatchObject([{ status: "stored", decision: { accepted: ["bob"] } }]);
  });

  it("is stored once when a redelivery races its original on another connection", async () => {
    const other = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
    try {
      for (let i = 0; i < 20; i++) {
        const e = await signed(`race-${i}`, [{ cid: "ghost" }, { cid: "ghost2" }], 16);
        const [x, y] = await Promise.all([
          commitBatch(db, [e.input], [], { now: NOW, queueReports: true }),
          commitBatch(other, [{ ...e.input, streamSeq: ++streamSeq }], [], { now: NOW, queueReports: true }),
        ]);
        expect([x[0]!.status, y[0]!.status].sort()).toEqual(["duplicate", "stored"]);
      }
    } finally {
      await other.close();
    }
    const { rows } = await sql<{ n: number; records: number }>`SELECT count(*)::int AS n, count(*) FILTER (WHERE token IS NULL)::int AS records FROM events`.execute(db.kysely);
    expect(rows[0]).toEqual({ n: 20, records: 20 });
    expect((await storedDecisions(db, [{ iss: "alpha", jti: "race-0" }]))[0]!.refused.map((r) => r.cid)).toEqual(["ghost", "ghost2"]);
  });
});

describe("retention of what was refused", () => {
  /** An event refused outright, as the receive loop records it. */
  const refusedOutright = (): RefusedInput => ({ streamSeq: ++streamSeq, subject: "fedrelay.in.beta.alpha", reason: "bad_signature", detail: "test", sample: "x" });

  it("deletes records and refused events past retention, oldest first and at most `limit` a round, but never a record whose event could still be accepted", async () => {
    const events = await Promise.all(["old-expired", "old-expired-2", "old-live", "new-expired"].map((jti) => signed(jti, ghosts(3), 16)));
    const kept = await signed("delivered-old", [{ cid: "bob", cap: bobCap }], 16);
    await commitBatch(db, [...events.map((e) => e.input), kept.input], [refusedOutright(), refusedOutright()], { now: NOW });
    const age = async (jti: string, receivedHoursAgo: number, expiredHoursAgo: number) =>
      sql`UPDATE events SET received_at = now() - make_interval(hours => ${receivedHoursAgo}), expires_at = now() - make_interval(hours => ${expiredHoursAgo})
          WHERE jti = ${jti}`.execute(db.kysely);
    await age("old-expired", 3, 2);
    await age("old-expired-2", 2, 1);
    // Received long ago, but its event has not expired yet (a lifetime of up to 7 days): it is the dedupe.
    await age("old-live", 3, -1);
    await age("new-expired", 0, 1);
    // Kept with its body: not retention's to delete.
    await age("delivered-old", 3, 2);
    await sql`UPDATE refused_events SET at = now() - interval '3 hours' WHERE stream_seq = (SELECT min(stream_seq) FROM refused_events)`.execute(db.kysely);

    const remaining = async () => (await db.kysely.selectFrom("events").select("jti").orderBy("jti").execute()).map((r) => r.jti);
    // A copy of old-expired stored in the inbox 3 hours ago, still waiting, would not be judged
    // expired: its record stays until that copy is gone.
    const waitingSince = new Date(Date.now() - 3 * 3600_000);
    expect(await pruneRefused(db, { retentionSeconds: 3600, graceSeconds: 300, limit: 10, oldestWaiting: waitingSince })).toEqual({ records: 0, refusedEvents: 1 });
    const options = { retentionSeconds: 3600, graceSeconds: 300, oldestWaiting: new Date() };
    expect(await pruneRefused(db, { ...options, limit: 1 })).toEqual({ records: 1, refusedEvents: 0 });
    expect(await remaining()).toEqual(["delivered-old", "new-expired", "old-expired-2", "old-live"]);
    expect(await pruneRefused(db, { ...options, limit: 10 })).toEqual({ records: 1, refusedEvents: 0 });
    expect(await remaining()).toEqual(["delivered-old", "new-expired", "old-live"]);
    expect(await pruneRefused(db, { ...options, limit: 10 })).toEqual({ records: 0, refusedEvents: 0 });
    const { rows } = await sql<{ n: string }>`SELECT count(*) AS n FROM refused_events`.execute(db.kysely);
    expect(rows[0]!.n).toBe("1");
  });
});
