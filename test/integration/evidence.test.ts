/**
 * Evidence of who sent an event (issue 17): `fedrelay evidence` against a real
 * beta that stored alpha's events, its bundle verified by jose alone and by an
 * independent JOSE implementation (Python's jwcrypto), and every way it must
 * fail when what is stored or bundled has been changed.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { calculateJwkThumbprint, compactVerify, importJWK } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { verifyEvidenceBundle, type EvidenceBundle } from "../../src/operations/evidence.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { addClient, eventually, grantCapability, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver, type Identity, type NatsClient, type TestHomeserver } from "../helpers/federation.ts";
import { REPO, runFedrelay, writeConfigFile } from "../helpers/processes.ts";

const run = promisify(execFile);
/** Debian's python3, where python3-jwcrypto is installed (.ci/run); a python3 of pyenv's may come first in PATH. */
const DEBIAN_PYTHON = "/usr/bin/python3";

let nats: LocalNats;
let beta: TestHomeserver;
let client: NatsClient;
let alpha: Identity;
let gamma: Identity;
let dir: string;
let config: string;

beforeAll(async () => {
  nats = await startLocalNats();
  [alpha, gamma] = await Promise.all([identity("alpha"), identity("gamma")]);
  beta = await startHomeserver(await identity("beta"), { natsUrl: nats.url, peers: [alpha, gamma] });
  client = await natsClient(nats.url);
  dir = await mkdtemp(join(tmpdir(), "fedrelay-evidence-"));
  config = await writeConfigFile({ homeserver: "beta", postgres: { url: beta.db.url, schema: beta.db.schema }, log: { level: "silent" } });
  await addClient(beta, "bob");
});

afterAll(async () => {
  await client?.close();
  await beta?.close();
  await nats?.stop();
  await rm(dir, { recursive: true, force: true });
});

/** Sends an event to beta and waits until it is stored. */
async function deliver(from: Identity, rcpt: { cid: string; cap?: string }[], extra: { jti?: string } = {}): Promise<{ jti: string; token: string }> {
  const event = await signed(from, "beta", rcpt, extra);
  await publishEvent(client.js, inboxSubject("beta", from.name), Buffer.from(event.token), 5000);
  await eventually(async () => (await beta.relay.db.kysely.selectFrom("events").select("jti").where("iss", "=", from.name).where("jti", "=", event.claims.jti).executeTakeFirst()) !== undefined, 10_000, "stored");
  return { jti: event.claims.jti, token: event.token };
}

// Event ids are base64url and may begin with "-": after "--", as the usage says.
describe("fedrelay evidence EVENT_ID", () => {
  it("prints the stored token, the key that verified it and a fresh verification, and writes a bundle that jose alone and jwcrypto verify", async () => {
    const cap = await grantCapability(beta, "bob", "g@alpha");
    const { jti, token } = await deliver(alpha, [{ cid: "bob", cap }]);
    const bundlePath = join(dir, "bundle.json");
    const result = await runFedrelay(["evidence", "--bundle", bundlePath, "--config", config, "--", jti]);
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    const printed = JSON.parse(result.stdout) as { kept: string; bundle: EvidenceBundle; key: { firstSeen: string }; verification: { ok: boolean } };
    expect(printed.kept).toBe("token");
    expect(printed.verification).toEqual({ ok: true, detail: expect.stringContaining("signed by alpha#k1") });
    expect(printed.bundle.token).toBe(token);
    expect(Date.parse(printed.key.firstSeen)).toBeLessThanOrEqual(Date.now());

    // jose alone, as any reader would: the key from the bundle, nothing of fedrelay's.
    const bundle = JSON.parse(await readFile(bundlePath, "utf8")) as EvidenceBundle;
    expect(bundle).toEqual(printed.bundle);
    expect(bundle.jwk).toEqual(alpha.publicJwk);
    const { payload, protectedHeader } = await compactVerify(bundle.token, await importJWK(bundle.jwk, "EdDSA"), { algorithms: ["EdDSA"] });
    const claims = JSON.parse(new TextDecoder().decode(payload)) as { iss: string; jti: string; body: string };
    expect([protectedHeader.kid, claims.iss, claims.jti]).toEqual([bundle.jwk.kid, bundle.iss, bundle.jti]);
    expect(await calculateJwkThumbprint(bundle.jwk)).toBe(bundle.thumbprint);
    expect(createHash("sha256").update(Buffer.from(claims.body, "base64url")).digest("base64url")).toBe(bundle.bodySha256);

    // Another JOSE implementation, in another language (scripts/verify-evidence.py).
    const python = await run(DEBIAN_PYTHON, [join(REPO, "scripts/verify-evidence.py"), bundlePath]);
    expect(python.stdout).toBe(`ok: event ${jti} was signed by alpha#k1 (key ${bundle.thumbprint}), received by beta at ${bundle.receivedAt}\n`);
  });

  it("a bundle changed in any part fails to verify, with jose and with jwcrypto, saying which part", async () => {
    const cap = await grantCapability(beta, "bob", "g@alpha");
    const { jti } = await deliver(alpha, [{ cid: "bob", cap }]);
    const bundlePath = join(dir, "changed.json");
    expect((await runFedrelay(["evidence", "--bundle", bundlePath, "--config", config, "--", jti])).code).toBe(0);
    const bundle = JSON.parse(await readFile(bundlePath, "utf8")) as EvidenceBundle;
    const [header, body, signature] = bundle.token.split(".") as [string, string, string];
    const other = await identity("alpha", "k1");
    const changes: [string, EvidenceBundle, RegExp][] = [
      ["a signature byte", { ...bundle, token: `${header}.${body}.${signature[0] === "A" ? "B" : "A"}${signature.slice(1)}` }, /signature does not verify/],
      ["another key under the same kid", { ...bundle, jwk: other.publicJwk as EvidenceBundle["jwk"], thumbprint: await calculateJwkThumbprint(other.publicJwk as EvidenceBundle["jwk"]) }, /signature does not verify/],
      ["the thumbprint", { ...bundle, thumbprint: bundle.thumbprint.replace(/^./, (c) => (c === "A" ? "B" : "A")) }, /thumbprint/],
      ["the sender", { ...bundle, iss: "gamma" }, /iss or jti/],
      ["the body hash", { ...bundle, bodySha256: createHash("sha256").update("else").digest("base64url") }, /body's SHA-256/],
    ];
    for (const [what, changed, why] of changes) {
      expect((await verifyEvidenceBundle(changed)).detail, what).toMatch(why);
      expect((await verifyEvidenceBundle(changed)).ok, what).toBe(false);
      const path = join(dir, "changed-one.json");
      await writeFile(path, JSON.stringify(changed));
      const python = await run(DEBIAN_PYTHON, [join(REPO, "scripts/verify-evidence.py"), path]).then(() => 0, (err: { code: number; stdout: string }) => err);
      expect(python, what).toMatchObject({ code: 1, stdout: expect.stringMatching(why) });
    }
  });

  it("exits 1 when the stored token no longer verifies with its key (the database was changed)", async () => {
    const cap = await grantCapability(beta, "bob", "g@alpha");
    const { jti, token } = await deliver(alpha, [{ cid: "bob", cap }]);
    const [header, , signature] = token.split(".");
    const forged = `${header}.${Buffer.from(JSON.stringify({ iss: "alpha", jti, body: "" })).toString("base64url")}.${signature}`;
    await beta.relay.db.kysely.updateTable("events").set({ token: forged }).where("iss", "=", "alpha").where("jti", "=", jti).execute();
    const result = await runFedrelay(["evidence", "--config", config, "--", jti]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(new RegExp(`^fedrelay evidence: event ${jti}'s stored token does not verify: the signature does not verify with the key.*\\n$`));
  });

  it("for an event delivered to no one prints its record, and refuses to write a bundle: there is no token to bundle", async () => {
    const { jti, token } = await deliver(alpha, [{ cid: "nobody" }]);
    const result = await runFedrelay(["evidence", "--config", config, "--", jti]);
    expect(result.code).toBe(0);
    expect(JSON.parse(result.stdout)).toMatchObject({
      kept: "record", iss: "alpha", jti, tokenSha256: createHash("sha256").update(token).digest("base64url"), refused: [["nobody", "no_capability"]],
    });
    const bundle = await runFedrelay(["evidence", "--bundle", join(dir, "none.json"), "--config", config, "--", jti]);
    expect(bundle.code).toBe(1);
    expect(bundle.stderr).toMatch(/^fedrelay evidence: event .* was delivered to no one: only a record of it was kept.*\n$/);
  });

  it("asks for --from when two senders used the event id, finds it with --from, and says so in one line when there is no such event", async () => {
    const jti = `shared-${Date.now()}`;
    await deliver(alpha, [{ cid: "nobody" }], { jti });
    await deliver(gamma, [{ cid: "nobody" }], { jti });
    const ambiguous = await runFedrelay(["evidence", "--config", config, "--", jti]);
    expect(ambiguous.code).not.toBe(0);
    expect(ambiguous.stderr).toMatch(/^fedrelay evidence: event id shared-\d+ was used by (alpha, gamma|gamma, alpha): name one with --from\n$/);
    const found = await runFedrelay(["evidence", "--from", "gamma", "--config", config, "--", jti]);
    expect(JSON.parse(found.stdout)).toMatchObject({ iss: "gamma", jti });
    const missing = await runFedrelay(["evidence", "no-such-event", "--config", config]);
    expect([missing.code, missing.stderr]).toEqual([1, "fedrelay evidence: no event no-such-event is stored\n"]);
    const bad = await runFedrelay(["evidence", "not an id", "--config", config]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^fedrelay evidence: needs an event id/);
  });

  it("GET /v1/admin/evidence/{jti} answers what the command prints, for the service token only", async () => {
    const cap = await grantCapability(beta, "bob", "g@alpha");
    const { jti } = await deliver(alpha, [{ cid: "bob", cap }]);
    const cli = JSON.parse((await runFedrelay(["evidence", "--config", config, "--", jti])).stdout) as { bundle: EvidenceBundle };
    const api = await http(`${beta.relay.url}/v1/admin/evidence/${jti}?from=alpha`, { token: SERVICE_TOKEN });
    expect(api.status).toBe(200);
    expect(api.json).toMatchObject({ kept: "token", bundle: cli.bundle, verification: { ok: true } });
    expect((await http(`${beta.relay.url}/v1/admin/evidence/${jti}`)).status).toBe(401);
    expect(await http(`${beta.relay.url}/v1/admin/evidence/nosuch`, { token: SERVICE_TOKEN })).toEqual({ status: 404, json: { error: "not_found", message: "no event nosuch is stored" } });
    expect((await http(`${beta.relay.url}/v1/admin/evidence/${jti}?from=-bad-`, { token: SERVICE_TOKEN })).status).toBe(400);
  });

  // Last: it revokes alpha's key for the rest of this file.
  it("fedrelay keys revoke-peer: the worker refuses the key's next event within a second, and the evidence of its stored events shows the revocation", async () => {
    const cap = await grantCapability(beta, "bob", "g@alpha");
    const { jti } = await deliver(alpha, [{ cid: "bob", cap }]);
    const revoked = await runFedrelay(["keys", "revoke-peer", "alpha#k1", "--config", config]);
    expect(revoked.stderr).toBe("");
    expect(revoked.stdout).toMatch(/^alpha#k1 \(key \S+\) revoked at \S+; \d+ stored events were verified with it\n$/);
    const evidence = JSON.parse((await runFedrelay(["evidence", "--config", config, "--", jti])).stdout) as { key: { revokedAt: string | null }; verification: { ok: boolean } };
    expect(evidence.key.revokedAt).not.toBeNull();
    // Still a valid signature: the revocation says the key may since be in other hands.
    expect(evidence.verification.ok).toBe(true);

    await new Promise((r) => setTimeout(r, 1000));
    const event = await signed(alpha, "beta", [{ cid: "bob", cap }]);
    await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(event.token), 5000);
    const refused = await eventually(async () => beta.relay.db.kysely.selectFrom("refused_events").select(["reason", "detail"]).where("claimed_jti", "=", event.claims.jti).executeTakeFirst(), 10_000, "refused");
    expect(refused).toEqual({ reason: "unknown_key", detail: expect.stringMatching(/^key alpha#k1 was revoked by this homeserver's operator at /) });
    const bad = await runFedrelay(["keys", "revoke-peer", "alpha", "--config", config]);
    expect([bad.code, bad.stderr]).toEqual([2, "fedrelay keys: keys revoke-peer needs a kid (<homeserver>#<key-id>), got \"alpha\"\n"]);
  });
});
