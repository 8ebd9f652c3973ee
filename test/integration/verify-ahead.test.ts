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
import { createReceiver } from "../../src/receiver.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { startBatchLoop } from "../../src/transport/consumer.ts";
import { ensureInbox } from "../../src/transport/streams.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import { eventually, identity, signed, type Identity } from "../helpers/federation.ts";

const SELF = "beta";
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

describe("verifying ahead", () => {
  it("verifies the messages behind a held-up batch, each exactly once, and commits them all", async () => {
    const config = loadConfig({ overrides: { homeserver: SELF } });
    await ensureInbox(await jetstreamManager(nc), SELF, { ...config.inbox, maxMessageBytes: config.limits.maxMessageBytes }, config.worker);
    const js = jetstream(nc);
    const n = 60;
    for (let i = 0; i < n; i++) {
      // Half of them carry a bad signature: refusals must come out the same when verified ahead.
      const { token } = await signed(alpha, SELF, [{ cid: `c${i}` }], { jti: `ahead-${i}` });
      const bytes = i % 2 === 0 ? token : `${token.slice(0, -4)}AAAA`;
      await js.publish(inboxSubject(SELF, "alpha"), Buffer.from(bytes), { msgID: `ahead-${i}` });
    }

    const registry = createKeyRegistry({ self: { homeserver: SELF, keys: [] }, peers: { alpha: { keys: [alpha.publicJwk as PublicJwk] } }, cooldownSeconds: 60 });
    await registry.ready;
    let verifications = 0;
    const keys = { isKnown: (hs: string) => registry.isKnown(hs), resolve: (kid: string) => { verifications += 1; return registry.resolve(kid); } };
    const receiver = createReceiver({
      self: SELF, db, keys, limits: DEFAULT_EVENT_LIMITS, metrics: createMetrics(), log: pino({ level: "silent" }),
      now: () => Date.now() / 1000, retryDelayMs: 100,
    });

    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const verifiedAtStart: number[] = [];
    const stored = new Set<number>();
    const refused = new Set<number>();
    const consumer = await js.consumers.get(inboxStreamName(SELF), config.worker.consumer);
    const loop = await startBatchLoop(consumer, { batchSize: 10, expiresMs: 1000, onBuffered: (m) => receiver.verifyAhead(m) }, async (batch: JsMsg[]) => {
      verifiedAtStart.push(verifications);
      if (verifiedAtStart.length === 1) await held;
      const result = await receiver.processBatch(batch);
      for (const o of result!.outcomes) stored.add(o.streamSeq);
      for (const r of result!.refused) refused.add(r.streamSeq);
    });

    // The first batch is held: the next ones are buffered and verified while it waits.
    await eventually(async () => verifications >= 30, 5000, "messages behind the held batch verified");
    release();
    await eventually(async () => stored.size + refused.size === n, 15_000, "all committed");
    await loop.stop();

    expect(verifications).toBe(n);
    expect(stored.size).toBe(n / 2);
    expect(refused.size).toBe(n / 2);
    // Some batch found all its messages verified before it began.
    expect(verifiedAtStart.slice(1).some((count, i) => count >= 10 * (i + 2))).toBe(true);
    const rows = await db.kysely.selectFrom("events").select("jti").execute();
    expect(rows.map((r) => r.jti).sort()).toEqual(Array.from({ length: n / 2 }, (_, k) => `ahead-${2 * k}`).sort());
  });
});
