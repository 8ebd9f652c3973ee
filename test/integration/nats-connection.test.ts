/**
 * The relay connects to NATS as a real tenant would (issue 14): a token, a TLS
 * client certificate, an nkey seed read from a file at start; and a refusal
 * is one line naming the server and what to check.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalHub, type LocalHub } from "../../src/federation/local-hub.ts";
import { freePort, startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { createRelay } from "../../src/relay.ts";
import { testSchema } from "../helpers/db.ts";
import { homeserverConfig, identity, SERVICE_TOKEN } from "../helpers/federation.ts";
import { REPO, startWorkerProcess, writeConfigFile } from "../helpers/processes.ts";

const run = promisify(execFile);
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "fedrelay-natsconn-"));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Starts a relay (worker) with `nats` settings; resolves to its /readyz status, or rejects with start's error. */
async function tryRelay(label: string, nats: Record<string, unknown>): Promise<number> {
  const db = testSchema(label);
  const config = homeserverConfig(await identity("beta"), db, { natsUrl: "unused", peers: [], overrides: { nats } });
  const relay = createRelay(config, { api: false, worker: true }, { log: pino({ level: "silent" }) });
  try {
    await relay.start();
    return (await fetch(`${relay.url}/readyz`)).status;
  } finally {
    await relay.close().catch(() => undefined);
    await db.drop();
  }
}

const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

describe("a token", () => {
  let nats: LocalNats;
  beforeAll(async () => {
    nats = await startLocalNats({ extraConfig: 'authorization { token: "s3cret-token-0123" }' });
  });
  afterAll(async () => {
    await nats?.stop();
  });

  it("the right one connects; a wrong or missing one fails start in one line naming the server and the setting", async () => {
    expect(await tryRelay("conn_token_ok", { servers: [nats.url], token: "s3cret-token-0123" })).toBe(200);
    await expect(tryRelay("conn_token_bad", { servers: [nats.url], token: "wrong" }))
      .rejects.toThrow(new RegExp(`^NATS ${escape(nats.url)} refused nats\\.token: authorization failed$`));
    await expect(tryRelay("conn_token_none", { servers: [nats.url] }))
      .rejects.toThrow(new RegExp(`^NATS ${escape(nats.url)} refused no credential \\(set nats\\.nkeySeedFile, nats\\.credsFile, nats\\.token or nats\\.user\\): authorization failed$`));
  });
});

describe("TLS with a client certificate", () => {
  let nats: LocalNats;
  const file = (name: string): string => join(dir, name);

  beforeAll(async () => {
    const openssl = (args: string[]) => run("openssl", args, { cwd: dir });
    await openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=fedrelay test CA", "-keyout", "ca.key", "-out", "ca.pem"]);
    for (const [name, ext] of [["server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"], ["client", "extendedKeyUsage=clientAuth"]] as const) {
      await writeFile(file(`${name}.ext`), `${ext}\n`);
      await openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", `/CN=${name}`, "-keyout", `${name}.key`, "-out", `${name}.csr`]);
      await openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-extfile", `${name}.ext`, "-out", `${name}.pem`]);
    }
    nats = await startLocalNats({ extraConfig: `tls { cert_file: "${file("server.pem")}", key_file: "${file("server.key")}", ca_file: "${file("ca.pem")}", verify: true }` });
  });
  afterAll(async () => {
    await nats?.stop();
  });

  it("connects with the CA and its certificate, and without the certificate fails start in one line that names TLS", async () => {
    const url = nats.url.replace("nats://", "tls://");
    expect(await tryRelay("conn_tls_ok", { servers: [url], tls: { caFile: file("ca.pem"), certFile: file("client.pem"), keyFile: file("client.key") } })).toBe(200);
    await expect(tryRelay("conn_tls_nocert", { servers: [url], tls: { caFile: file("ca.pem") } }))
      .rejects.toThrow(new RegExp(`^NATS ${escape(url)}: .*\\(TLS: check nats\\.tls\\)$`));
  });
});

describe("an nkey seed file, read at start", () => {
  let hub: LocalHub;
  beforeAll(async () => {
    hub = await startLocalHub({ homeservers: { beta: "shared" } });
  });
  afterAll(async () => {
    await hub?.stop();
  });

  it("fedrelay worker connects to the hub with the seed file nats-config wrote; a missing one exits 2 naming nats.nkeySeedFile", async () => {
    const db = testSchema("conn_seed_file");
    const id = await identity("beta");
    const settings = await hub.relaySettings("beta") as { nats: Record<string, unknown> };
    const { nkeySeed: _seed, ...nats } = settings.nats;
    const base = {
      ...settings, homeserver: "beta", postgres: { url: db.url, schema: db.schema, poolSize: 2 },
      http: { port: 0, serviceToken: SERVICE_TOKEN }, keys: { signingKey: id.jwk }, log: { level: "warn" },
    };
    try {
      const good = await writeConfigFile({ ...base, nats: { ...nats, nkeySeedFile: join(hub.dir, "homeservers/beta/nkey.seed") } });
      const worker = await startWorkerProcess(good);
      expect((await fetch(`${worker.url}/readyz`)).status).toBe(200);
      expect(await worker.stop()).toBe(0);

      const missing = join(dir, "no-such.seed");
      const bad = await writeConfigFile({ ...base, nats: { ...nats, nkeySeedFile: missing } });
      const result = await run(process.execPath, ["src/main.ts", "worker", "--config", bad], { cwd: REPO }).then(() => ({ code: 0, stderr: "" }), (e: { code: number; stderr: string }) => e);
      expect(result.code).toBe(2);
      expect(result.stderr).toMatch(new RegExp(`^fedrelay worker: cannot read nats\\.nkeySeedFile ${escape(missing)}: ENOENT\\n$`));
    } finally {
      await db.drop();
    }
  });

  it("two credentials at once are refused naming them", async () => {
    const port = await freePort();
    const err = await tryRelay("conn_two_creds", { servers: [`nats://127.0.0.1:${port}`], token: "a", user: "b", pass: "c" }).catch((e: Error) => e);
    expect((err as Error).message).toMatch(/at most one credential/);
  });
});
