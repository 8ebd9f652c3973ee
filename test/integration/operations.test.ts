/**
 * The operator actions the CLI and the backend API share (src/operations/),
 * run against Postgres: what they store, what they answer, and what they
 * refuse as not_found. Each test has its own schema.
 */
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { issueCapabilityFor, listCapabilitiesOf, revokeCapabilityFor } from "../../src/operations/capabilities.ts";
import { putRateLimit, removeRateLimit, showRateLimits } from "../../src/operations/rate-limits.ts";
import { putServerRule, removeServerRule, setPolicyMode, showPolicy } from "../../src/operations/server-policy.ts";
import { loadConfig } from "../../src/config.ts";
import { mergePolicies, OPEN_POLICY } from "../../src/policy/server-rules.ts";
import { registerClient } from "../../src/store/clients.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate } from "../../src/store/migrate.ts";
import { mergeRateLimits } from "../../src/store/server-policy.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";

let schema: TestSchema;
let db: Db;

beforeEach(async (context) => {
  schema = testSchema(`ops ${context.task.name}`);
  db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
  await migrate(db.pool, schema.schema);
});

afterEach(async () => {
  await db?.close();
  await schema?.drop();
});

const notFound = (message: string) => ({ name: "RelayError", code: "not_found", message });
const merged = showPolicy((runtime) => mergePolicies({ ...OPEN_POLICY, deny: ["spam.net"] }, runtime));

describe("server rules and mode", () => {
  it("a put rule shows in the run-time part and in force after the configured ones; putting it again changes its action", async () => {
    expect(await putServerRule("*.example.org", "deny")(db)).toEqual({ pattern: "*.example.org", action: "deny" });
    expect(await putServerRule("gamma", "allow")(db)).toEqual({ pattern: "gamma", action: "allow" });
    expect(await merged(db)).toEqual({
      mode: "open", allow: ["gamma"], deny: ["spam.net", "*.example.org"],
      runtime: { mode: undefined, rules: [{ pattern: "*.example.org", action: "deny" }, { pattern: "gamma", action: "allow" }] },
    });
    await putServerRule("gamma", "deny")(db);
    expect((await merged(db)).runtime.rules).toEqual([{ pattern: "*.example.org", action: "deny" }, { pattern: "gamma", action: "deny" }]);
  });

  it("removing a run-time rule takes it away; one that is not there (or only configured) is not_found", async () => {
    await putServerRule("gamma", "deny")(db);
    await removeServerRule("gamma")(db);
    expect((await merged(db)).runtime.rules).toEqual([]);
    await expect(removeServerRule("gamma")(db)).rejects.toMatchObject(notFound("no run-time rule gamma"));
    await expect(removeServerRule("spam.net")(db)).rejects.toMatchObject(notFound("no run-time rule spam.net"));
  });

  it("a run-time mode overrides the configured one", async () => {
    expect(await setPolicyMode("allowlist")(db)).toEqual({ mode: "allowlist" });
    expect(await merged(db)).toMatchObject({ mode: "allowlist", runtime: { mode: "allowlist" } });
    await setPolicyMode("open")(db);
    expect(await merged(db)).toMatchObject({ mode: "open", runtime: { mode: "open" } });
  });

  it("what is in force comes from the caller, its run-time part from the database", async () => {
    await putServerRule("gamma", "deny")(db);
    const inForce = { mode: "allowlist" as const, allow: ["alpha"], deny: [] };
    expect(await showPolicy(() => inForce)(db)).toEqual({ ...inForce, runtime: { mode: undefined, rules: [{ pattern: "gamma", action: "deny" }] } });
  });
});

describe("rate-limit overrides", () => {
  const configured = loadConfig({ env: {} }).rateLimits;
  const show = showRateLimits((runtime) => mergeRateLimits(configured, runtime));

  it("a homeserver's and a client's override answer with their name under their scope, and apply over the configured limits", async () => {
    expect(await putRateLimit("server", "beta", { rate: 50, burst: 5000 })(db)).toEqual({ server: "beta", rate: 50, burst: 5000 });
    expect(await putRateLimit("client", "bot", { rate: 1, burst: 3 })(db)).toEqual({ client: "bot", rate: 1, burst: 3 });
    await putRateLimit("client", "bot", { rate: 2, burst: 4 })(db);
    const shown = await show(db);
    expect(shown.runtime).toEqual({ servers: { beta: { rate: 50, burst: 5000 } }, clients: { bot: { rate: 2, burst: 4 } } });
    expect(shown).toMatchObject({ client: configured.client, servers: { beta: { rate: 50, burst: 5000 } }, clients: { bot: { rate: 2, burst: 4 } } });
  });

  it("removing an override takes only that scope's; one that is not there is not_found", async () => {
    await putRateLimit("client", "beta", { rate: 1, burst: 3 })(db);
    await expect(removeRateLimit("server", "beta")(db)).rejects.toMatchObject(notFound("no run-time limit for beta"));
    await removeRateLimit("client", "beta")(db);
    expect((await show(db)).runtime).toEqual({ servers: {}, clients: {} });
    await expect(removeRateLimit("client", "beta")(db)).rejects.toMatchObject(notFound("no run-time limit for beta"));
  });
});

describe("capabilities", () => {
  it("are issued only for a registered client, with the secret once; the list holds no secret", async () => {
    await expect(issueCapabilityFor("bob", "g@alpha")(db)).rejects.toMatchObject(notFound("no client bob"));
    await expect(listCapabilitiesOf("bob")(db)).rejects.toMatchObject(notFound("no client bob"));
    await registerClient(db, "bob");
    const issued = await issueCapabilityFor("bob", "g@alpha")(db);
    expect(issued).toEqual({
      id: expect.any(String), capability: expect.stringMatching(/^[A-Za-z0-9_-]{43}$/), client: "bob", group: "g@alpha", owner: "alpha",
      created_at: expect.any(String), revoked_at: null,
    });
    const { capability: _secret, ...info } = issued;
    expect(await listCapabilitiesOf("bob")(db)).toEqual({ capabilities: [info] });
  });

  it("a client revokes only its own (another's is not_found, like an unknown id); an operator revokes any, and twice keeps the first time", async () => {
    await registerClient(db, "bob");
    await registerClient(db, "eve");
    const { id } = await issueCapabilityFor("bob", "g@alpha")(db);
    await expect(revokeCapabilityFor(id, "eve")(db)).rejects.toMatchObject(notFound(`no capability ${id}`));
    await expect(revokeCapabilityFor(id, "nobody")(db)).rejects.toMatchObject(notFound("no client nobody"));
    await expect(revokeCapabilityFor("no-such-id")(db)).rejects.toMatchObject(notFound("no capability no-such-id"));
    expect((await listCapabilitiesOf("bob")(db)).capabilities[0]!.revoked_at).toBeNull();

    await revokeCapabilityFor(id)(db);
    const first = (await listCapabilitiesOf("bob")(db)).capabilities[0]!.revoked_at;
    expect(first).toEqual(expect.any(String));
    await revokeCapabilityFor(id, "bob")(db);
    expect((await listCapabilitiesOf("bob")(db)).capabilities[0]!.revoked_at).toBe(first);
  });
});
