import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import {
  addClient, eventually, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient, type TestHomeserver,
} from "../helpers/federation.ts";
import { scrapeMetric } from "../helpers/metrics.ts";
import { startWorkerProcess, writeConfigFile, type WorkerProcess } from "../helpers/processes.ts";

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity;
let api: TestHomeserver;
let workers: WorkerProcess[] = [];

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  const [a, beta] = await Promise.all([identity("alpha"), identity("beta")]);
  alpha = a;
  // The API process; the receivers are two separate `fedrelay worker` processes on the same database.
  api = await startHomeserver(beta, { natsUrl: nats.url, peers: [alpha], roles: { api: true, worker: false } });
  // Small batches, so both workers take part in every phase.
  const path = await writeConfigFile({ ...api.config, keys: { retired: [] }, http: { port: 0 }, worker: { ...api.config.worker, batchSize: 10 }, log: { level: "warn" } });
  workers = await Promise.all([startWorkerProcess(path), startWorkerProcess(path)]);
});

afterAll(async () => {
  const codes = await Promise.all(workers.map((w) => w.stop()));
  expect(codes.every((c) => c === 0)).toBe(true);
  await api?.close();
  await client?.close();
  await nats?.stop();
});

const perWorker = (name: string, labels: Record<string, string> = {}) => Promise.all(workers.map((w) => scrapeMetric(w.url, name, labels)));

async function publishMany(n: number, rcpt: { cid: string; cap: string }[]): Promise<void> {
  for (let i = 0; i < n; i += 50) {
    await Promise.all(Array.from({ length: Math.min(50, n - i) }, async () => {
      const e = await signed(alpha, "beta", rcpt);
      await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(e.token), 5000);
    }));
  }
}

async function count(table: "deliveries" | "all_recipient_refusals" | "refused_events", reason?: string): Promise<number> {
  let q = api.relay.db.kysely.selectFrom(table).select((eb) => eb.fn.countAll<string>().as("n"));
  if (reason) q = q.where("reason", "=", reason);
  return Number((await q.executeTakeFirstOrThrow()).n);
}

describe("changes reach every worker process within one second, with no restart", () => {
  it("a capability both workers have used is refused capability_revoked by whichever worker takes it, one second after revocation", async () => {
    const token = await addClient(api, "bob");
    const issued = await http(`${api.relay.url}/v1/capabilities`, { method: "POST", token, body: { group: "g@alpha" } });
    const cap = issued.json.capability as string;

    await publishMany(200, [{ cid: "bob", cap }]);
    await eventually(async () => (await count("deliveries")) === 200, 20_000, "200 deliveries");
    const acceptedBefore = await perWorker("fedrelay_events_accepted_total");
    // Both workers have accepted events with this capability.
    for (const n of acceptedBefore) expect(n).toBeGreaterThan(0);

    const revoked = await http(`${api.relay.url}/v1/capabilities/${issued.json.id as string}`, { method: "DELETE", token });
    expect(revoked.status).toBe(204);
    await new Promise((r) => setTimeout(r, 1000));

    await publishMany(200, [{ cid: "bob", cap }]);
    await eventually(async () => (await count("all_recipient_refusals", "capability_revoked")) === 200, 20_000, "200 refusals");
    expect(await count("deliveries")).toBe(200);
    const refused = await perWorker("fedrelay_recipients_refused_total", { reason: "capability_revoked" });
    expect(refused.reduce((a, b) => a + b, 0)).toBe(200);
    for (const n of refused) expect(n).toBeGreaterThan(0);
  });

  it("a deny rule added through the admin API is applied by every worker within one second", async () => {
    const put = await http(`${api.relay.url}/v1/admin/policy/rules/alpha`, { method: "PUT", token: SERVICE_TOKEN, body: { action: "deny" } });
    expect(put).toEqual({ status: 200, json: { pattern: "alpha", action: "deny" } });
    await new Promise((r) => setTimeout(r, 1000));

    const token = await addClient(api, "carol");
    const issued = await http(`${api.relay.url}/v1/capabilities`, { method: "POST", token, body: { group: "g@alpha" } });
    await publishMany(100, [{ cid: "carol", cap: issued.json.capability as string }]);
    await eventually(async () => (await count("refused_events", "sender_denied")) === 100, 20_000, "100 sender_denied");
    const denied = await perWorker("fedrelay_events_refused_total", { reason: "sender_denied" });
    expect(denied.reduce((a, b) => a + b, 0)).toBe(100);
    for (const n of denied) expect(n).toBeGreaterThan(0);
    const messages = await http(`${api.relay.url}/v1/messages`, { token });
    expect(messages.json.messages).toEqual([]);
  });
});
