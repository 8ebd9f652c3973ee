import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SignJWT } from "jose";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createClientTokens } from "../../src/client-tokens.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { generateSigningJwk, importSigningKey } from "../../src/protocol/keys.ts";
import { readMigrations } from "../../src/store/migrate.ts";
import { TEST_DATABASE_URL, testSchema, type TestSchema } from "../helpers/db.ts";
import { baseEnv, runFedrelay } from "../helpers/processes.ts";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const SUBCOMMANDS = ["keygen", "migrate", "serve", "worker", "client-add", "evidence", "token-keys", "demo"];
const BASE64URL_TOKEN = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/** An error on stderr is exactly one line. */
function expectOneLine(stderr: string, pattern?: RegExp): void {
  expect(stderr).toMatch(/^[^\n]+\n$/);
  if (pattern) expect(stderr).toMatch(pattern);
}

function dbEnv(db: TestSchema): Record<string, string> {
  return { FEDRELAY_POSTGRES__URL: db.url, FEDRELAY_POSTGRES__SCHEMA: db.schema };
}

let dir: string;
const schemas: TestSchema[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "fedrelay-cli-"));
});

afterAll(async () => {
  for (const db of schemas) await db.drop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

function schema(label: string): TestSchema {
  const db = testSchema(label);
  schemas.push(db);
  return db;
}

/** The homeserver alpha's client tokens, over the schema the CLI wrote to. */
async function withTokens(db: TestSchema, fn: (tokens: ReturnType<typeof createClientTokens>, handle: Db) => Promise<void>): Promise<void> {
  const handle = createDb({ url: db.url, schema: db.schema, poolSize: 1 });
  try {
    await fn(createClientTokens({ self: "alpha", db: handle, ttlSeconds: 86_400, now: () => Date.now() / 1000 }), handle);
  } finally {
    await handle.close();
  }
}

describe("usage", () => {
  it("--help lists every subcommand and exits 0", async () => {
    for (const flag of ["--help", "-h", "help"]) {
      const run = await runFedrelay([flag]);
      expect({ flag, code: run.code, stderr: run.stderr }).toEqual({ flag, code: 0, stderr: "" });
      expect(run.stdout).toMatch(/usage: fedrelay <command>/);
      for (const name of SUBCOMMANDS) expect(run.stdout).toMatch(new RegExp(`^  ${name} +\\S`, "m"));
    }
  });

  it("<command> --help exits 0 with the command's usage", async () => {
    for (const name of SUBCOMMANDS) {
      const run = await runFedrelay([name, "--help"]);
      expect({ name, code: run.code, stderr: run.stderr }).toEqual({ name, code: 0, stderr: "" });
      expect(run.stdout).toContain(`usage: fedrelay ${name}`);
    }
  });

  it("no command exits 2 and shows the usage", async () => {
    const run = await runFedrelay([]);
    expect(run.code).toBe(2);
    expect(run.stdout + run.stderr).toMatch(/usage: fedrelay <command>/);
  });

  it("an unknown command exits 2 with a one-line message", async () => {
    const run = await runFedrelay(["frobnicate"]);
    expect(run.code).toBe(2);
    expectOneLine(run.stderr, /^fedrelay: unknown command "frobnicate"/);
    expect(run.stdout).toBe("");
  });

  it("an unknown flag exits 2 with one line on stderr naming it", async () => {
    for (const args of [["keygen", "--bogus"], ["migrate", "--homeserver", "x"], ["serve", "-z"]]) {
      const run = await runFedrelay(args);
      expect({ args, code: run.code }).toEqual({ args, code: 2 });
      expectOneLine(run.stderr, new RegExp(`^fedrelay ${args[0]}: .*${args[1]}`));
    }
  });
});

describe("keygen", () => {
  it("writes an Ed25519 private JWK with mode 0600, prints the public JWK, and never overwrites it", async () => {
    const out = join(dir, "a.jwk.json");
    const run = await runFedrelay(["keygen", "--homeserver", "alpha", "--key-id", "k9", "--out", out]);
    expect(run.code).toBe(0);
    expectOneLine(run.stderr, /alpha#k9/);

    const text = await readFile(out, "utf8");
    const jwk = JSON.parse(text) as Record<string, unknown>;
    expect(jwk).toMatchObject({ kty: "OKP", crv: "Ed25519", kid: "alpha#k9", x: expect.any(String), d: expect.any(String) });
    expect(importSigningKey(jwk).kid).toBe("alpha#k9");
    expect((await stat(out)).mode & 0o777).toBe(0o600);

    const lines = run.stdout.split("\n").filter(Boolean);
    expect(lines).toHaveLength(1);
    const printed = JSON.parse(lines[0]!) as Record<string, unknown>;
    expect(printed).not.toHaveProperty("d");
    const { d: _d, ...publicPart } = jwk;
    expect(printed).toEqual(publicPart);

    const again = await runFedrelay(["keygen", "--homeserver", "alpha", "--key-id", "k9", "--out", out]);
    expect(again.code).not.toBe(0);
    expectOneLine(again.stderr, /^fedrelay keygen: /);
    expect(again.stdout).toBe("");
    expect(await readFile(out, "utf8")).toBe(text);
  });

  it("without --homeserver exits 2 with one line", async () => {
    const out = join(dir, "none.jwk.json");
    const run = await runFedrelay(["keygen", "--out", out]);
    expect(run.code).toBe(2);
    expectOneLine(run.stderr, /--homeserver/);
    expect(existsSync(out)).toBe(false);
  });

  it("with an invalid homeserver name or key id exits 2 with one line and writes nothing", async () => {
    const out = join(dir, "bad.jwk.json");
    const badName = await runFedrelay(["keygen", "--homeserver", "Bad_Name", "--out", out]);
    expect(badName.code).toBe(2);
    expectOneLine(badName.stderr, /Bad_Name/);
    const badKeyId = await runFedrelay(["keygen", "--homeserver", "alpha", "--key-id", "no spaces", "--out", out]);
    expect(badKeyId.code).toBe(2);
    expectOneLine(badKeyId.stderr, /no spaces/);
    expect(existsSync(out)).toBe(false);
  });
});

describe("migrate", () => {
  it("applies 001_init.sql and every later migration, then reports the schema up to date", async () => {
    const db = schema("cli-migrate");
    const names = (await readMigrations()).map((m) => m.name);
    expect(names[0]).toBe("001_init.sql");
    const first = await runFedrelay(["migrate"], dbEnv(db));
    expect(first).toMatchObject({ code: 0, stdout: `applied ${names.join(", ")} to schema ${db.schema}\n`, stderr: "" });
    const second = await runFedrelay(["migrate"], dbEnv(db));
    expect(second).toMatchObject({ code: 0, stdout: `schema ${db.schema} is up to date\n`, stderr: "" });

    const client = new pg.Client({ connectionString: TEST_DATABASE_URL });
    await client.connect();
    try {
      const { rows } = await client.query<{ table_name: string }>(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name", [db.schema]);
      expect(rows.map((r) => r.table_name)).toEqual(expect.arrayContaining(["clients", "deliveries", "events", "migrations"]));
    } finally {
      await client.end();
    }
  });

  it("exits as soon as it is done instead of holding its Postgres connections open", async () => {
    const db = schema("cli-migrate-exit");
    for (const expected of [/^applied /, /up to date/]) {
      const run = await runFedrelay(["migrate"], dbEnv(db));
      expect(run.code).toBe(0);
      expect(run.stdout).toMatch(expected);
      // A behaviour bound, not a benchmark: the work takes well under a second; an idle pool would keep the process for 10 s.
      expect(run.ms).toBeLessThan(5000);
    }
  });

  it("exits 1 with one line when Postgres is unreachable", async () => {
    const run = await runFedrelay(["migrate"], { FEDRELAY_POSTGRES__URL: "postgresql://postgres@127.0.0.1:1/test", FEDRELAY_POSTGRES__SCHEMA: "t_unreachable" });
    expect(run.code).toBe(1);
    expectOneLine(run.stderr, /^fedrelay migrate: /);
  });
});

describe("configuration errors", () => {
  it("a config file with an invalid value exits 2 naming the key", async () => {
    const file = join(dir, "bad-port.json");
    await writeFile(file, JSON.stringify({ http: { port: "x" } }));
    for (const command of ["migrate", "serve", "worker"]) {
      for (const flag of ["--config", "-c"]) {
        const run = await runFedrelay([command, flag, file]);
        expect({ command, flag, code: run.code }).toEqual({ command, flag, code: 2 });
        expectOneLine(run.stderr, /http\.port/);
      }
    }
  });

  it("an invalid value from the environment exits 2 naming the key", async () => {
    const run = await runFedrelay(["migrate"], { FEDRELAY_HTTP__PORT: "70000" });
    expect(run.code).toBe(2);
    expectOneLine(run.stderr, /http\.port/);
  });

  it("an unknown key in the config file exits 2 naming it", async () => {
    const file = join(dir, "unknown-key.json");
    await writeFile(file, JSON.stringify({ htpp: { port: 80 } }));
    const run = await runFedrelay(["migrate", "--config", file]);
    expect(run.code).toBe(2);
    expectOneLine(run.stderr, /htpp/);
  });

  it("a config file that does not exist exits 2 naming the path", async () => {
    const missing = join(dir, "does-not-exist.json");
    const run = await runFedrelay(["migrate", "--config", missing]);
    expect(run.code).toBe(2);
    expectOneLine(run.stderr);
    expect(run.stderr).toContain(missing);
    const viaEnv = await runFedrelay(["migrate"], { FEDRELAY_CONFIG: missing });
    expect(viaEnv.code).toBe(2);
    expectOneLine(viaEnv.stderr);
    expect(viaEnv.stderr).toContain(missing);
  });

  it("a config file that is not JSON exits 2 naming the path", async () => {
    const file = join(dir, "not-json.json");
    await writeFile(file, "{ http: \n port: 80 }\n");
    const run = await runFedrelay(["migrate", "--config", file]);
    expect(run.code).toBe(2);
    expectOneLine(run.stderr);
    expect(run.stderr).toContain(file);
  });
});

describe("client-add", () => {
  let keyFile: string;

  beforeAll(async () => {
    keyFile = join(dir, "client-add", "alpha.jwk.json");
    const run = await runFedrelay(["keygen", "--homeserver", "alpha", "--key-id", "k1", "--out", keyFile]);
    expect(run.code).toBe(0);
  });

  it("registers the client and prints a token that this homeserver accepts", async () => {
    const db = schema("cli-client-add");
    const env = { ...dbEnv(db), FEDRELAY_HOMESERVER: "alpha", FEDRELAY_KEYS__SIGNING_KEY_FILE: keyFile };
    const run = await runFedrelay(["client-add", "bob"], env);
    expect(run.code).toBe(0);
    expectOneLine(run.stderr, /bob registered/);
    const lines = run.stdout.split("\n").filter(Boolean);
    expect(lines).toHaveLength(1);
    const token = lines[0]!;
    expect(token).toMatch(BASE64URL_TOKEN);

    await withTokens(db, async (tokens) => expect(await tokens.verify(token)).toBe("bob"));

    const client = new pg.Client({ connectionString: TEST_DATABASE_URL });
    await client.connect();
    try {
      const { rows } = await client.query<{ id: string }>(`SELECT id FROM "${db.schema}".clients`);
      expect(rows).toEqual([{ id: "bob" }]);
    } finally {
      await client.end();
    }

    const again = await runFedrelay(["client-add", "bob"], env);
    expect(again.code).toBe(0);
    expectOneLine(again.stderr, /already registered/);
    expect(again.stdout).toMatch(/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n$/);
  });

  it("needs no federation signing key: client tokens have keys of their own", async () => {
    const db = schema("cli-client-nokey");
    const run = await runFedrelay(["client-add", "bob"], { ...dbEnv(db), FEDRELAY_HOMESERVER: "alpha" });
    expect(run.code).toBe(0);
    await withTokens(db, async (tokens) => expect(await tokens.verify(run.stdout.trim())).toBe("bob"));
  });

  it("with a signing key file that does not exist exits 2 with one line naming the path", async () => {
    const missing = join(dir, "no-such-key.json");
    const run = await runFedrelay(["client-add", "bob"], { FEDRELAY_KEYS__SIGNING_KEY_FILE: missing });
    expect(run.code).toBe(2);
    expectOneLine(run.stderr);
    expect(run.stderr).toContain(missing);
  });

  it("without a valid client id exits 2 with one line", async () => {
    for (const args of [["client-add"], ["client-add", "bad id"]]) {
      const run = await runFedrelay(args, { FEDRELAY_KEYS__SIGNING_KEY_FILE: keyFile });
      expect({ args, code: run.code }).toEqual({ args, code: 2 });
      expectOneLine(run.stderr, /client id/);
    }
  });
});

describe("token-keys", () => {
  it("rotate signs with a new key and keeps the old one's tokens valid; a token made with a retired key after its retirement and every token of a revoked key are refused", async () => {
    const db = schema("cli-token-keys");
    const env = { ...dbEnv(db), FEDRELAY_HOMESERVER: "alpha" };
    const before = (await runFedrelay(["client-add", "bob"], env)).stdout.trim();
    const listed = await runFedrelay(["token-keys", "list"], env);
    expect(listed.code).toBe(0);
    const [first] = JSON.parse(listed.stdout) as { id: string; signing: boolean }[];
    expect(first).toMatchObject({ signing: true, retiredAt: null, revokedAt: null });

    const rotated = await runFedrelay(["token-keys", "rotate"], env);
    expect(rotated.code).toBe(0);
    expect(rotated.stdout).toMatch(new RegExp(`^signing with \\S+; retired ${first!.id}\n$`));
    const after = (await runFedrelay(["client-add", "bob"], env)).stdout.trim();
    const keys = JSON.parse((await runFedrelay(["token-keys", "list"], env)).stdout) as { id: string; signing: boolean; retiredAt: string | null }[];
    expect(keys.map((k) => [k.id === first!.id, k.signing, k.retiredAt !== null])).toEqual([[true, false, true], [false, true, false]]);
    expect(JSON.parse(Buffer.from(after.split(".")[0]!, "base64url").toString()) as unknown).toMatchObject({ kid: keys[1]!.id });

    await withTokens(db, async (tokens, handle) => {
      expect(await tokens.verify(before)).toBe("bob");
      expect(await tokens.verify(after)).toBe("bob");
      // Whoever holds the retired secret can still sign, but nothing it signs after the retirement counts.
      const { secret } = await handle.kysely.selectFrom("client_token_keys").select("secret").where("id", "=", first!.id).executeTakeFirstOrThrow();
      const claims = JSON.parse(Buffer.from(before.split(".")[1]!, "base64url").toString()) as Record<string, unknown>;
      const now = Math.floor(Date.now() / 1000) + 2;
      const late = await new SignJWT({ ...claims, iat: now, exp: now + 3600 }).setProtectedHeader({ alg: "HS256", typ: "fedrelay-client+jwt", kid: first!.id }).sign(secret);
      await expect(tokens.verify(late)).rejects.toMatchObject({ code: "unauthorized", message: expect.stringMatching(/revoked/) });
    });

    const revoked = await runFedrelay(["token-keys", "revoke", first!.id], env);
    expect({ code: revoked.code, stdout: revoked.stdout }).toEqual({ code: 0, stdout: `revoked ${first!.id}\n` });
    await withTokens(db, async (tokens) => {
      await expect(tokens.verify(before)).rejects.toMatchObject({ code: "unauthorized" });
      expect(await tokens.verify(after)).toBe("bob");
    });
    const again = await runFedrelay(["token-keys", "revoke", first!.id], env);
    expect(again.code).toBe(1);
    expectOneLine(again.stderr, /no unrevoked token key/);
  });

  it("a bad action exits 2 with one line, before touching the database", async () => {
    for (const args of [["token-keys"], ["token-keys", "spin"], ["token-keys", "revoke"]]) {
      const run = await runFedrelay(args, { FEDRELAY_POSTGRES__URL: "postgresql://nobody@127.0.0.1:1/none" });
      expect({ args, code: run.code }).toEqual({ args, code: 2 });
      expectOneLine(run.stderr, /token-keys/);
    }
  });
});

describe("operator commands: policy, ratelimit, capability", () => {
  it("bad input exits 2 with one line naming what is wrong, before touching the database", async () => {
    for (const [args, message] of [
      [["policy", "allow", "Not_A_Name"], /"Not_A_Name" is not a homeserver name or \*\.suffix pattern/],
      [["policy", "remove"], /"" is not a homeserver name/],
      [["policy", "mode", "closed"], /policy mode must be open or allowlist, got "closed"/],
      [["policy", "frob"], /policy takes list, allow, deny, remove or mode/],
      [["ratelimit", "set", "server", "beta", "1", "5"], /burst: must be at least 1000 for a homeserver/],
      [["ratelimit", "set", "galaxy", "beta", "1", "5"], /scope must be server or client/],
      [["ratelimit", "remove", "client", "bad id"], /"bad id" is not a client id/],
      [["capability", "issue", "bob", "no-owner"], /capability group: must be <local>@<owner>/],
      [["capability", "revoke"], /capability revoke needs a capability id/],
    ] as const) {
      const run = await runFedrelay(args, { FEDRELAY_POSTGRES__URL: "postgresql://nobody@127.0.0.1:1/none" });
      expect({ args, code: run.code, stdout: run.stdout }).toEqual({ args, code: 2, stdout: "" });
      expectOneLine(run.stderr, new RegExp(`^fedrelay ${args[0]}: .*${message.source}`));
    }
  });

  it("policy changes print one line each, and list shows the policy in force, the configured part and the run-time part", async () => {
    const db = schema("cli-policy");
    const env = { ...dbEnv(db), FEDRELAY_POLICY__DENY: JSON.stringify(["spam.net"]) };
    expect(await runFedrelay(["policy", "deny", "*.example.org"], env)).toMatchObject({ code: 0, stdout: "deny *.example.org\n", stderr: "" });
    expect(await runFedrelay(["policy", "allow", "gamma"], env)).toMatchObject({ code: 0, stdout: "allow gamma\n", stderr: "" });
    expect(await runFedrelay(["policy", "mode", "allowlist"], env)).toMatchObject({ code: 0, stdout: "mode allowlist\n", stderr: "" });
    const listed = await runFedrelay(["policy", "list"], env);
    expect(listed.code).toBe(0);
    expect(listed.stdout).toBe(`${JSON.stringify({
      mode: "allowlist", allow: ["gamma"], deny: ["spam.net", "*.example.org"],
      configured: { mode: "open", allow: [], deny: ["spam.net"] },
      runtime: { mode: "allowlist", rules: [{ pattern: "*.example.org", action: "deny" }, { pattern: "gamma", action: "allow" }] },
    }, null, 2)}\n`);
    expect(await runFedrelay(["policy", "remove", "gamma"], env)).toMatchObject({ code: 0, stdout: "removed gamma\n" });
    const again = await runFedrelay(["policy", "remove", "gamma"], env);
    expect(again.code).toBe(1);
    expectOneLine(again.stderr, /^fedrelay policy: no run-time rule gamma\n$/);
  });

  it("ratelimit set, list and remove an override", async () => {
    const db = schema("cli-ratelimit");
    const env = dbEnv(db);
    expect(await runFedrelay(["ratelimit", "set", "client", "bot", "1", "3"], env)).toMatchObject({ code: 0, stdout: "client bot: 1/s, burst 3\n", stderr: "" });
    const listed = await runFedrelay(["ratelimit", "list"], env);
    expect(listed.code).toBe(0);
    expect(JSON.parse(listed.stdout)).toMatchObject({ clients: { bot: { rate: 1, burst: 3 } }, runtime: { servers: {}, clients: { bot: { rate: 1, burst: 3 } } } });
    expect(await runFedrelay(["ratelimit", "remove", "client", "bot"], env)).toMatchObject({ code: 0, stdout: "removed client bot\n" });
    const again = await runFedrelay(["ratelimit", "remove", "client", "bot"], env);
    expect(again.code).toBe(1);
    expectOneLine(again.stderr, /^fedrelay ratelimit: no run-time limit for bot\n$/);
  });

  it("capability issue prints the secret once, list shows it without the secret, revoke revokes it; an unknown client exits 1", async () => {
    const db = schema("cli-capability");
    const env = { ...dbEnv(db), FEDRELAY_HOMESERVER: "alpha" };
    const unknown = await runFedrelay(["capability", "issue", "bob", "g@alpha"], env);
    expect(unknown.code).toBe(1);
    expectOneLine(unknown.stderr, /^fedrelay capability: no client bob\n$/);
    expect((await runFedrelay(["client-add", "bob"], env)).code).toBe(0);
    const issued = await runFedrelay(["capability", "issue", "bob", "g@alpha"], env);
    expect(issued.code).toBe(0);
    const id = /^fedrelay: capability (\S+) for bob in g@alpha; the secret \(shown once\):\n$/.exec(issued.stderr)?.[1];
    expect(id).toBeDefined();
    expect(issued.stdout).toMatch(/^[A-Za-z0-9_-]{43}\n$/);
    const listed = await runFedrelay(["capability", "list", "bob"], env);
    expect(JSON.parse(listed.stdout)).toEqual([{ id, client: "bob", group: "g@alpha", owner: "alpha", created_at: expect.any(String), revoked_at: null }]);
    expect(listed.stdout).not.toContain(issued.stdout.trim());
    expect(await runFedrelay(["capability", "revoke", id!], env)).toMatchObject({ code: 0, stdout: `revoked ${id}\n` });
    expect((JSON.parse((await runFedrelay(["capability", "list", "bob"], env)).stdout) as { revoked_at: string | null }[])[0]!.revoked_at).toEqual(expect.any(String));
  });
});

describe("serve", () => {
  let nats: LocalNats;
  let keyFile: string;
  let publicJwk: object;

  beforeAll(async () => {
    nats = await startLocalNats();
    const jwk = await generateSigningJwk("delta", "k1", Math.floor(Date.now() / 1000) - 60);
    keyFile = join(dir, "delta.jwk.json");
    await writeFile(keyFile, JSON.stringify(jwk), { mode: 0o600 });
    publicJwk = importSigningKey(jwk).publicJwk;
  });

  afterAll(async () => {
    await nats?.stop();
  });

  it("serves the API until SIGTERM, then exits 0", async () => {
    const db = schema("cli-serve");
    const child: ChildProcess = spawn(process.execPath, ["src/main.ts", "serve"], {
      cwd: ROOT,
      env: {
        ...baseEnv(), ...dbEnv(db), NATS_URL: nats.url,
        FEDRELAY_HOMESERVER: "delta", FEDRELAY_KEYS__SIGNING_KEY_FILE: keyFile, FEDRELAY_HTTP__PORT: "0",
        FEDRELAY_HTTP__SERVICE_TOKEN: "cli-serve-service-token-0123", FEDRELAY_LOG__LEVEL: "silent",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stderr = "";
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
    try {
      const url = await new Promise<string>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`serve did not start: ${stderr}`)), 30_000);
        child.stderr!.on("data", () => {
          const m = /^fedrelay: delta serving on (http:\/\/\S+)$/m.exec(stderr);
          if (m) { clearTimeout(timer); resolve(m[1]!); }
        });
        void exited.then((code) => { clearTimeout(timer); reject(new Error(`serve exited ${code}: ${stderr}`)); });
      });
      // Served on the public listener (no http.operator), readiness needs the service token.
      expect((await fetch(`${url}/readyz`)).status).toBe(401);
      const ready = await fetch(`${url}/readyz`, { headers: { authorization: "Bearer cli-serve-service-token-0123" } });
      expect({ status: ready.status, body: await ready.json() as unknown })
        .toEqual({ status: 200, body: { ok: true, checks: { postgres: true, nats: true, worker: true, streams: true } } });
      const jwks = await (await fetch(`${url}/.well-known/fedrelay/jwks.json`)).json() as { keys: unknown[] };
      expect(jwks.keys).toEqual([publicJwk]);
      const put = await fetch(`${url}/v1/clients/dora`, { method: "PUT", headers: { authorization: "Bearer cli-serve-service-token-0123" } });
      expect(put.status).toBe(201);

      child.kill("SIGTERM");
      expect(await exited).toBe(0);
      expect(stderr).toMatch(/^fedrelay: delta serving on http:\/\/\S+\n$/);
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await exited;
    }
  });
});
