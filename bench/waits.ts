/**
 * `npm run bench:waits -- --n 5000`: what a waiting long-poll costs an API
 * process. Starts `fedrelay serve` on its own NATS and schema, opens N
 * long-polls (`GET /v1/messages?wait=240`, 1,000 per client) and reads the
 * process's resident memory before and while they wait. The figure behind
 * http.maxWaits' default (src/config.ts).
 */
import { request } from "node:http";
import { readFile } from "node:fs/promises";
import { parseArgs } from "node:util";
import { startLocalNats } from "../src/local-nats.ts";
import { generateSigningJwk } from "../src/protocol/keys.ts";
import { testSchema } from "../test/helpers/db.ts";
import { startWorkerProcess, writeConfigFile } from "../test/helpers/processes.ts";

const { values: args } = parseArgs({ options: { n: { type: "string" } } });
const N = Number(args.n ?? 5000);
const PER_CLIENT = 1000;
const TOKEN = "bench-waits-service-token-0123";

const nats = await startLocalNats();
const db = testSchema("bench_waits");
const path = await writeConfigFile({
  homeserver: "waits", nats: { servers: [nats.url] }, postgres: { url: db.url, schema: db.schema, poolSize: 10 },
  http: { port: 0, serviceToken: TOKEN, maxWaits: N + 1, maxWaitsPerClient: PER_CLIENT, maxWaitSeconds: 300, maxConnectionsPerSource: N + 100, maxConnections: N + 100 },
  keys: { signingKey: await generateSigningJwk("waits", "bench", Math.floor(Date.now() / 1000)) }, log: { level: "warn" },
});
const relay = await startWorkerProcess(path, "serve");
try {
  const rssMb = async (): Promise<number> => Number(/^VmRSS:\s+(\d+) kB/m.exec(await readFile(`/proc/${relay.child.pid}/status`, "utf8"))![1]) / 1024;
  const { port } = new URL(relay.url);
  const call = (method: string, p: string, token: string): Promise<string> => new Promise((resolve, reject) => {
    const r = request({ host: "127.0.0.1", port, method, path: p, headers: { authorization: `Bearer ${token}` }, agent: false }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString())).on("end", () => resolve(body));
    });
    r.on("error", reject).end();
  });
  const tokens: string[] = [];
  for (let c = 0; c < Math.ceil(N / PER_CLIENT); c++) {
    await call("PUT", `/v1/clients/c${c}`, TOKEN);
    tokens.push((JSON.parse(await call("POST", `/v1/clients/c${c}/tokens`, TOKEN)) as { token: string }).token);
  }
  // Warm the paths a poll takes, so the difference is the waiting alone.
  for (let i = 0; i < 200; i++) await call("GET", "/v1/messages", tokens[0]!);
  await new Promise((r) => setTimeout(r, 1000));
  const before = await rssMb();
  const polls: Promise<unknown>[] = [];
  for (let i = 0; i < N; i++) {
    // Killed with the relay at the end, unanswered: nothing to wait for.
    polls.push(call("GET", "/v1/messages?wait=240", tokens[i % tokens.length]!).catch(() => undefined));
    if (i % 200 === 199) await new Promise((r) => setTimeout(r, 50));
  }
  // Each poll is authenticated and looked up in Postgres before it waits: until all N wait.
  const waitingNow = async (): Promise<number> => Number(/^fedrelay_http_waiting_requests (\S+)/m.exec(await call("GET", "/metrics", TOKEN))?.[1] ?? 0);
  const deadline = Date.now() + 120_000;
  while ((await waitingNow()) < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 500));
  await new Promise((r) => setTimeout(r, 1000));
  const during = await rssMb();
  const waiting = await waitingNow();
  process.stdout.write(`${N} long-polls (${waiting} waiting): resident ${before.toFixed(1)} MB before, ${during.toFixed(1)} MB while they wait: ${((during - before) * 1024 / N).toFixed(1)} KB each\n`);
} finally {
  relay.child.kill("SIGKILL");
  await nats.stop();
  await db.drop();
}
process.exit(0);
