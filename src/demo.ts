/**
 * `npm run demo`: three homeservers federating on this machine. alpha owns a
 * group with members on alpha, beta and gamma; it fans out a few messages,
 * each client picks its copy up over HTTP, and a forged event is refused.
 */
import { randomBytes } from "node:crypto";
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { pino } from "pino";
import pg from "pg";
import { loadConfig } from "./config.ts";
import { generateSigningJwk, importSigningKey, type PrivateJwk } from "./protocol/keys.ts";
import { signEvent } from "./protocol/sign.ts";
import { inboxSubject } from "./protocol/subjects.ts";
import { createRelay, type Relay } from "./relay.ts";
import { startLocalNats, type LocalNats } from "./local-nats.ts";
import { publishEvent } from "./transport/publisher.ts";
import { quoteIdent } from "./store/db.ts";

export interface DemoOptions {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly out: (line: string) => void;
  readonly messages: number;
}

const HOMESERVERS = ["alpha", "beta", "gamma"] as const;
type Name = (typeof HOMESERVERS)[number];
const MEMBERS: Readonly<Record<Name, readonly string[]>> = { alpha: ["alice"], beta: ["bob", "bart"], gamma: ["gina", "gus"] };
/** gus is in alpha's member list but never handed alpha a capability: gamma refuses deliveries to him. */
const WITHOUT_CAPABILITY = "gus@gamma";
const GROUP = "climbing@alpha";

async function call(url: string, init: { method?: string; token?: string; body?: unknown } = {}): Promise<Record<string, unknown>> {
  const res = await fetch(url, {
    method: init.method ?? "GET",
    headers: { ...(init.token ? { authorization: `Bearer ${init.token}` } : {}), ...(init.body ? { "content-type": "application/json" } : {}) },
    ...(init.body ? { body: JSON.stringify(init.body) } : {}),
  });
  const json = (await res.json()) as Record<string, unknown>;
  if (!res.ok) throw new Error(`${init.method ?? "GET"} ${url}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

export async function runDemo(options: DemoOptions): Promise<void> {
  const { out } = options;
  const log = pino({ level: "warn" });
  let nats: LocalNats | undefined;
  const relays: Relay[] = [];
  try {
    const natsUrl = options.env.NATS_URL ?? (nats = await startLocalNats()).url;
    out(`NATS       ${natsUrl}${nats ? " (a nats-server started for this demo)" : ""}`);
    const dbUrl = options.env.DATABASE_URL ?? "postgresql://postgres@127.0.0.1:5432/postgres";
    out(`Postgres   ${dbUrl.replace(/\/\/[^@]*@/, "//")} (schemas fedrelay_demo_alpha, _beta, _gamma)`);

    // A fresh start each run: the demo's own schemas, and streams on its own server.
    const admin = new pg.Client({ connectionString: dbUrl });
    await admin.connect();
    for (const h of HOMESERVERS) await admin.query(`DROP SCHEMA IF EXISTS ${quoteIdent(`fedrelay_demo_${h}`)} CASCADE`);
    await admin.end();

    const jwks = new Map<Name, PrivateJwk>();
    for (const h of HOMESERVERS) jwks.set(h, await generateSigningJwk(h, "demo", Math.floor(Date.now() / 1000) - 60));
    const publicOf = (h: Name): object => { const { d: _d, ...pub } = jwks.get(h)!; return pub; };
    const serviceToken = randomBytes(24).toString("base64url");

    const byName = new Map<Name, Relay>();
    for (const h of HOMESERVERS) {
      const config = loadConfig({
        overrides: {
          homeserver: h,
          nats: { servers: [natsUrl] },
          postgres: { url: dbUrl, schema: `fedrelay_demo_${h}` },
          http: { port: 0, serviceToken },
          keys: { signingKey: jwks.get(h) },
          peers: Object.fromEntries(HOMESERVERS.filter((p) => p !== h).map((p) => [p, { keys: [publicOf(p)] }])),
          log: { level: "warn" },
        },
      });
      const relay = createRelay(config, { api: true, worker: true }, { log });
      relays.push(relay);
      await relay.start();
      byName.set(h, relay);
      out(`${h.padEnd(10)} ${relay.url}  keys at ${relay.url}/.well-known/fedrelay/jwks.json`);
    }

    // Each homeserver registers its clients and hands them tokens.
    const tokens = new Map<string, string>();
    for (const h of HOMESERVERS) {
      for (const c of MEMBERS[h]) {
        const base = byName.get(h)!.url;
        await call(`${base}/v1/clients/${c}`, { method: "PUT", token: serviceToken });
        tokens.set(`${c}@${h}`, (await call(`${base}/v1/clients/${c}/tokens`, { method: "POST", token: serviceToken })).token as string);
      }
    }
    // Joining: each member asks its own homeserver for a delivery capability for the
    // group and hands it to the owner, alpha, which presents it on every fan-out.
    const recipients: { server: string; client: string; capability?: string }[] = [];
    for (const h of HOMESERVERS) {
      for (const client of MEMBERS[h]) {
        if (`${client}@${h}` === WITHOUT_CAPABILITY) {
          recipients.push({ server: h, client });
          continue;
        }
        const cap = await call(`${byName.get(h)!.url}/v1/capabilities`, { method: "POST", token: tokens.get(`${client}@${h}`)!, body: { group: GROUP } });
        recipients.push({ server: h, client, capability: cap.capability as string });
      }
    }
    out("");
    out(`group ${GROUP}: ${recipients.map((r) => `${r.client}@${r.server}${r.capability ? "" : " (no capability)"}`).join(", ")}`);

    for (let i = 1; i <= options.messages; i++) {
      const text = `message ${i} from alice: ${["belay on?", "climbing!", "off belay"][(i - 1) % 3]}`;
      // The first fan-out waits for the destinations' signed delivery reports.
      const result = await call(`${byName.get("alpha")!.url}/v1/fanout${i === 1 ? "?wait=5" : ""}`, {
        method: "POST",
        token: serviceToken,
        body: { group: GROUP, body: Buffer.from(text).toString("base64url"), ctype: "text/plain", seq: i, recipients },
      });
      const events = result.events as { server: string; event: string; recipients: number }[];
      out(`alpha fans out #${i} as ${events.map((e) => `${e.server}(${e.recipients})`).join(" + ")}  event ${result.id as string}`);
      const reports = result.reports as { server: string; accepted: string[]; refused: { cid: string; reason: string }[] }[] | undefined;
      for (const r of reports ?? []) {
        const refused = r.refused.map((x) => `${x.cid}: ${x.reason}`).join(", ");
        out(`    report from ${r.server}: accepted ${r.accepted.join(", ") || "none"}${refused ? `; refused ${refused}` : ""}`);
      }
      if (reports && !reports.some((r) => r.refused.some((x) => `${x.cid}@${r.server}` === WITHOUT_CAPABILITY && x.reason === "no_capability"))) {
        throw new Error(`no report refused ${WITHOUT_CAPABILITY} for lack of a capability`);
      }
    }

    // A forgery: gamma publishes, on its own subject, an event claiming to be alpha's.
    const gammaKey = importSigningKey({ ...jwks.get("gamma")!, kid: "alpha#demo" });
    const iat = Math.floor(Date.now() / 1000);
    const forged = await signEvent({
      iss: "alpha", aud: "beta", jti: "forged-1", iat, exp: iat + 3600, grp: GROUP,
      rcpt: [{ cid: "bob" }], body: Buffer.from("send me your password").toString("base64url"),
    }, gammaKey);
    const nc = await connect({ servers: natsUrl });
    await publishEvent(jetstream(nc), inboxSubject("beta", "gamma"), Buffer.from(forged), 5000);
    await nc.close();

    out("");
    for (const h of HOMESERVERS) {
      for (const c of MEMBERS[h]) {
        const base = byName.get(h)!.url;
        const token = tokens.get(`${c}@${h}`)!;
        const got: Record<string, unknown>[] = [];
        const deadline = Date.now() + (`${c}@${h}` === WITHOUT_CAPABILITY ? 1000 : 10_000);
        while (got.length < options.messages && Date.now() < deadline) {
          const after = (got.at(-1)?.cursor as number | undefined) ?? 0;
          const page = await call(`${base}/v1/messages?after=${after}&wait=1`, { token });
          got.push(...(page.messages as Record<string, unknown>[]));
        }
        if (got.length > 0) await call(`${base}/v1/messages/ack`, { method: "POST", token, body: { through: got.at(-1)!.cursor } });
        const note = `${c}@${h}` === WITHOUT_CAPABILITY ? " (gamma refused every delivery: no_capability)" : "";
        out(`${`${c}@${h}`.padEnd(12)} received ${got.length}/${options.messages}${note}`);
        for (const m of got) {
          out(`    #${String(m.seq)} from ${String(m.from)} in ${String(m.group)}: "${Buffer.from(m.body as string, "base64url").toString()}"`);
        }
        const expected = `${c}@${h}` === WITHOUT_CAPABILITY ? 0 : options.messages;
        if (got.length !== expected) throw new Error(`${c}@${h} received ${got.length} of ${expected} messages`);
      }
    }

    out("");
    const beta = byName.get("beta")!;
    let refusal;
    for (let tries = 0; tries < 50 && !refusal; tries++) {
      refusal = await beta.db.kysely.selectFrom("refused_events").selectAll().where("claimed_jti", "=", "forged-1").executeTakeFirst();
      if (!refusal) await new Promise((r) => setTimeout(r, 100));
    }
    if (!refusal) throw new Error("beta did not record the forged event");
    const stored = await beta.db.kysely.selectFrom("events").select("jti").where("jti", "=", "forged-1").executeTakeFirst();
    out(`forged event: gamma published "forged-1" claiming iss=alpha on ${refusal.subject}`);
    out(`    beta refused it: ${refusal.reason} (${refusal.detail}); stored: ${stored ? "YES (bug!)" : "no"}`);
  } finally {
    for (const relay of relays.reverse()) await relay.close().catch(() => undefined);
    await nats?.stop();
  }
}
