/**
 * The baseline of `npm run bench`: the ideal pipeline, with none of the relay's
 * code, doing the least any relay must do for the same events. Pull a batch
 * from a JetStream durable consumer, verify each Ed25519 JWS, write each new
 * event once (id and token, as the relay must keep them) and one delivery row
 * per recipient, in one transaction, then acknowledge.
 *
 * usage: node bench/baseline-worker.ts NATS_URL STREAM CONSUMER PG_URL TABLE PUBLIC_X BATCH [sodium|node] [unnest|copy]
 *
 * The verifier is libsodium, the fastest available (the relay uses it too);
 * `node` verifies with node:crypto, kept as an extra column. The delivery rows
 * go in with one of Postgres's two bulk paths: `unnest`, one statement that
 * inserts the events and the deliveries of those that were new (a single round
 * trip); or `copy`, the events inserted first, then COPY FROM STDIN of the new
 * ones' deliveries (pg-copy-streams), in a transaction. bench/run.ts measures
 * both and takes the faster per case.
 *
 * A delivery's order among a client's deliveries is the event's stream sequence:
 * unique per event, and no counter to keep (TABLE_deliveries, primary key
 * (client_id, seq), as the relay's deliveries table).
 */
import { createPublicKey, verify } from "node:crypto";
import { pipeline } from "node:stream/promises";
import { Readable } from "node:stream";
import sodium from "sodium-native";
import { jetstream, type JsMsg } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import pg from "pg";
import { from as copyFrom } from "pg-copy-streams";

const [natsUrl, stream, consumerName, pgUrl, table, publicX, batchText, verifier = "sodium", write = "unnest"] =
  process.argv.slice(2) as [string, string, string, string, string, string, string, string?, string?];
const batchSize = Number(batchText);
const key = createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: publicX }, format: "jwk" });
const rawKey = Buffer.from(publicX, "base64url");
const verifies = verifier === "sodium"
  ? (input: Buffer, signature: Buffer): boolean => sodium.crypto_sign_verify_detached(signature, input, rawKey)
  : (input: Buffer, signature: Buffer): boolean => verify(null, input, key, signature);
const pool = new pg.Pool({ connectionString: pgUrl, max: 2 });
const nc = await connect({ servers: natsUrl });
const consumer = await jetstream(nc).consumers.get(stream, consumerName);

let stopping = false;
process.on("SIGTERM", () => { stopping = true; void messages.close(); });
// Pull continuously (twice a batch buffered) and process whatever has arrived by the
// next macrotask, up to a batch: no waiting to fill a batch, as an ideal pipeline would.
const messages = await consumer.consume({ max_messages: batchSize * 2 });
const queue: JsMsg[] = [];
let wake: (() => void) | undefined;
let ended = false;
void (async () => {
  for await (const m of messages) { queue.push(m); wake?.(); wake = undefined; }
  ended = true;
  wake?.();
})();
process.stderr.write("ready\n");

interface Verified { jti: string; token: string; seq: number; rcpt: string[] }

async function writeUnnest(events: readonly Verified[]): Promise<void> {
  const client: string[] = [];
  const seq: number[] = [];
  const jti: string[] = [];
  for (const e of events) for (const cid of e.rcpt) { client.push(cid); seq.push(e.seq); jti.push(e.jti); }
  await pool.query(
    `WITH new AS (
       INSERT INTO ${table} (jti, token) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING RETURNING jti
     )
     INSERT INTO ${table}_deliveries (client_id, seq, jti)
     SELECT d.client_id, d.seq, d.jti FROM unnest($3::text[], $4::bigint[], $5::text[]) AS d(client_id, seq, jti) JOIN new USING (jti)`,
    [events.map((e) => e.jti), events.map((e) => e.token), client, seq, jti],
  );
}

async function writeCopy(events: readonly Verified[]): Promise<void> {
  const db = await pool.connect();
  try {
    await db.query("BEGIN");
    const { rows } = await db.query<{ jti: string }>(
      `INSERT INTO ${table} (jti, token) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING RETURNING jti`,
      [events.map((e) => e.jti), events.map((e) => e.token)],
    );
    const isNew = new Set(rows.map((r) => r.jti));
    // Client ids and jtis here are plain tokens: no tab, newline or backslash to escape.
    const lines: string[] = [];
    for (const e of events) if (isNew.has(e.jti)) for (const cid of e.rcpt) lines.push(`${cid}\t${e.seq}\t${e.jti}\n`);
    if (lines.length > 0) await pipeline(Readable.from([lines.join("")]), db.query(copyFrom(`COPY ${table}_deliveries (client_id, seq, jti) FROM STDIN`)));
    await db.query("COMMIT");
  } catch (err) {
    await db.query("ROLLBACK").catch(() => undefined);
    throw err;
  } finally {
    db.release();
  }
}

const writeBatch = write === "copy" ? writeCopy : writeUnnest;

while (!stopping) {
  if (queue.length === 0) {
    if (ended) break;
    await new Promise<void>((r) => (wake = r));
    continue;
  }
  await new Promise<void>((r) => setImmediate(r));
  const batch = queue.splice(0, batchSize);
  const events: Verified[] = [];
  for (const m of batch) {
    const token = Buffer.from(m.data).toString("latin1");
    const dot1 = token.indexOf(".");
    const dot2 = token.indexOf(".", dot1 + 1);
    const ok = verifies(Buffer.from(m.data.buffer, m.data.byteOffset, dot2), Buffer.from(token.slice(dot2 + 1), "base64url"));
    if (!ok) continue;
    const claims = JSON.parse(Buffer.from(token.slice(dot1 + 1, dot2), "base64url").toString("utf8")) as { jti: string; rcpt: { cid: string }[] };
    events.push({ jti: claims.jti, token, seq: m.seq, rcpt: claims.rcpt.map((r) => r.cid) });
  }
  if (events.length > 0) await writeBatch(events);
  for (const m of batch) m.ack();
}
await nc.drain();
await pool.end();
