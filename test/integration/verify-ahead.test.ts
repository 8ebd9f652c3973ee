/**
 * The receiver verifies buffered messages ahead of their batch
 * (Receiver.verifyAhead, wired to the pull loop's onBuffered), against a real
 * nats-server and Postgres: while one batch is held up, the messages behind it
 * are verified; each message is verified exactly once, whether ahead or by its
 * batch; and every one is committed with the outcome it would have had.
 */
import { jetstream, jetstreamManager, type JsMsg } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import { createKeyRegistry } from "../../src/keys/registry.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { createMetrics } from "../../src/metrics.ts";
import { DEFAULT_EVENT_LIMITS } from "../../src/protocol/claims.ts";
import type { PublicJwk } from "../../src/protocol/keys.ts";
import { inboxStreamName, inboxSubject } from "../../src/protocol/subjects.ts";
import { createReceiver } from "../../src/receive/batch.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { startBatchLoop } from "../../src/transport/consumer.ts";
import { ensureInbox, inboxConsumerName } from "../../src/transport/streams.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import { eventually, identity, signed, type Identity } from "../helpers/federation.ts";

let nats: LocalNats;
let nc: NatsConnection;
let schema: TestSchema;
let db: Db;
let alpha: Identity;

beforeAll(async () => {
  nats = await startLocalNats();
  nc = await connect({ servers: nats.url });
  schema = testSchema("verify-ahead");
  db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  await migrate(db.pool, schema.schema);
  alpha = await identity("alpha");
});

afterAll(async () => {
  await nc?.close();
  await nats?.stop();
  await db?.close();
  await schema?.drop();
});

/**
 * Publishes `n` events (half with a bad signature) into a fresh inbox, runs a
 * receiver on them whose first batch is held until `whileHeld` has run, and
 * reports how many verifications happened in all and before each batch.
 */
async function scenario(self: string, n: number, aheadLimit: ((sizes: readonly number[]) => number) | undefined, whileHeld: (verifications: () => number) => Promise<void>) {
  const config = loadConfig({ overrides: { homeserver: self } });
  await ensureInbox(await jetstreamManager(nc), self, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker, ["alpha"]);
  const js = jetstream(nc);
  const sizes: number[] = [];
  for (let i = 0; i < n; i++) {
    // Half of them carry a bad signature: refusals must come out the same when verified ahead.
    const { token } = await signed(alpha, self, [{ cid: `c${i}` }], { jti: `${self}-${i}` });
    const bytes = Buffer.from(i % 2 === 0 ? token : `${token.slice(0, -4)}AAAA`);
    sizes.push(bytes.length);
    await js.publish(inboxSubject(self, "alpha"), bytes, { msgID: `${self}-${i}` });
  }

  const registry = createKeyRegistry({ self: { homeserver: self, keys: [] }, peers: { alpha: { keys: [alpha.publicJwk as PublicJwk] } } });
  await registry.ready;
  let verifications = 0;
  const keys = { isKnown: (hs: string) => registry.isKnown(hs), lookup: (kid: string, at: number) => { verifications += 1; return registry.lookup(kid, at); } };
  const receiver = createReceiver({
    self, db, keys, limits: DEFAULT_EVENT_LIMITS, metrics: createMetrics(), log: pino({ level: "silent" }),
    now: () => Date.now() / 1000, retryDelayMs: 100, ...(aheadLimit ? { maxVerifyAheadBytes: aheadLimit(sizes) } : {}),
  });

  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  const verifiedAtStart: number[] = [];
  const stored = new Set<number>();
  const refused = new Set<number>();
  const consumer = await js.consumers.get(inboxStreamName(self), inboxConsumerName(config.worker.consumer, "alpha"));
  // One batch at a time: while the first is held, the others wait buffered (20 of them).
  const loop = await startBatchLoop(consumer, { batchSize: 10, inFlight: 1, expiresMs: 1000, onBuffered: (m) => receiver.verifyAhead(m) }, async (batch: JsMsg[]) => {
    verifiedAtStart.push(verifications);
    if (verifiedAtStart.length === 1) await held;
    const result = await receiver.processBatch(batch);
    for (const o of result!.outcomes) stored.add(o.streamSeq);
    for (const r of result!.refused) refused.add(r.streamSeq);
  });
  await eventually(async () => verifiedAtStart.length >= 1, 5000, "the first batch");
  await whileHeld(() => verifications);
  release();
  await eventually(async () => stored.size + refused.size === n, 15_000, "all committed");
  await loop.stop();
  return { verifications, verifiedAtStart, stored: stored.size, refused: refused.size };
}

describe("verifying ahead", () => {
  it("verifies the messages behind a held-up batch, each exactly once, and commits them all", async () => {
    const n = 60;
    const run = await scenario("beta", n, undefined, async (verifications) => {
      // The first batch is held: the next ones are buffered and verified while it waits.
      await eventually(async () => verifications() >= 20, 5000, "the messages buffered behind the held batch verified");
    });
    expect(run.verifications).toBe(n);
    expect(run.stored).toBe(n / 2);
    expect(run.refused).toBe(n / 2);
    // Some batch found all its messages verified before it began.
    expect(run.verifiedAtStart.slice(1).some((count, i) => count >= 10 * (i + 2))).toBe(true);
    const rows = await db.kysely.selectFrom("events").select("jti").where("iss", "=", "alpha").where("jti", "like", "beta-%").execute();
    expect(rows.map((r) => r.jti).sort()).toEqual(Array.from({ length: n / 2 }, (_, k) => `beta-${2 * k}`).sort());
  });

  it("holds at most maxVerifyAheadBytes verified ahead; the rest are verified by their batch, once", async () => {
    const n = 40;
    // Room for five of these messages (they are all about the same size).
    const run = await scenario("gamma", n, (sizes) => 5.5 * Math.max(...sizes), async (verifications) => {
      // Time for the buffered messages to be verified ahead, as far as the limit lets them.
      await new Promise((r) => setTimeout(r, 500));
      expect(verifications()).toBeGreaterThan(0);
      expect(verifications()).toBeLessThanOrEqual(5);
    });
    expect(run.verifications).toBe(n);
    expect(run.stored + run.refused).toBe(n);
  });
});
