/**
 * The baseline of `npm run bench`: the ideal pipeline, with none of the relay's
 * code. Pull a batch from a JetStream durable consumer, verify each Ed25519 JWS
 * with node:crypto, insert the batch's events (id and token, as the relay must
 * keep them) with one multi-row INSERT … ON CONFLICT DO NOTHING, acknowledge.
 *
 * usage: node bench/baseline-worker.ts NATS_URL STREAM CONSUMER PG_URL TABLE PUBLIC_X BATCH [node|sodium]
 *
 * The last argument picks the verifier: node:crypto, as the issue defines the
 * baseline, or libsodium, as the relay verifies (so the relay's own overhead
 * can be read apart from its faster verifier).
 */
import { createPublicKey, verify } from "node:crypto";
import sodium from "sodium-native";
import { jetstream, type JsMsg } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import pg from "pg";

const [natsUrl, stream, consumerName, pgUrl, table, publicX, batchText, verifier = "node"] = process.argv.slice(2) as [string, string, string, string, string, string, string, string?];
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

while (!stopping) {
  if (queue.length === 0) {
    if (ended) break;
    await new Promise<void>((r) => (wake = r));
    continue;
  }
  await new Promise<void>((r) => setImmediate(r));
  const batch = queue.splice(0, batchSize);
  const jtis: string[] = [];
  const tokens: string[] = [];
  for (const m of batch) {
    const token = Buffer.from(m.data).toString("latin1");
    const dot1 = token.indexOf(".");
    const dot2 = token.indexOf(".", dot1 + 1);
    const ok = verifies(Buffer.from(m.data.buffer, m.data.byteOffset, dot2), Buffer.from(token.slice(dot2 + 1), "base64url"));
    if (!ok) continue;
    const claims = JSON.parse(Buffer.from(token.slice(dot1 + 1, dot2), "base64url").toString("utf8")) as { jti: string };
    jtis.push(claims.jti);
    tokens.push(token);
  }
  await pool.query(`INSERT INTO ${table} (jti, token) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING`, [jtis, tokens]);
  for (const m of batch) m.ack();
}
await nc.drain();
await pool.end();
