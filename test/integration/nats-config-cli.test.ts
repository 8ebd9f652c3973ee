/**
 * `fedrelay nats-config` and `fedrelay nats-provision` as an operator runs them:
 * the committed example is exactly what the command writes, every config it
 * writes is one nats-server accepts, seeds stay secret and stable, and
 * provisioning creates and repairs what the hub holds.
 */
import { execFile } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { promisify } from "node:util";
import { createUser } from "@nats-io/nkeys";
import { connect, nanos, nkeyAuthenticator } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { adminManager } from "../../src/federation/provision.ts";
import { freePort, natsServerBinary, startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { REPO } from "../helpers/processes.ts";

const run = promisify(execFile);
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "fedrelay-natscfg-"));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** `fedrelay ARGS`: exit code, stdout, stderr. */
async function fedrelay(args: readonly string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, ["src/main.ts", ...args], { cwd: REPO, env: { ...process.env, FEDRELAY_CONFIG: undefined } });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

async function filesUnder(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(root, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) out.push(relative(root, join(entry.parentPath, entry.name)));
  }
  return out.sort();
}

describe("fedrelay nats-config", () => {
  it("writes, from deploy/federation.example.json, exactly the committed deploy/nats-hub", async () => {
    const out = join(dir, "example");
    const result = await fedrelay(["nats-config", "--federation", "deploy/federation.example.json", "--out", out]);
    expect(result.code).toBe(0);
    const committed = join(REPO, "deploy/nats-hub");
    expect(await filesUnder(out)).toEqual(await filesUnder(committed));
    for (const file of await filesUnder(out)) {
      expect({ file, text: await readFile(join(out, file), "utf8") }).toEqual({ file, text: await readFile(join(committed, file), "utf8") });
    }
  });

  it("writes configs nats-server accepts, hub nodes and bridged homeservers' own servers alike", async () => {
    const binary = await natsServerBinary();
    const out = join(REPO, "deploy/nats-hub");
    const seed = new TextDecoder().decode(createUser().getSeed());
    for (const file of (await filesUnder(out)).filter((f) => f.endsWith(".conf"))) {
      const check = await run(binary, ["-t", "-c", join(out, file)], { env: { ...process.env, FEDRELAY_NKEY_SEED: seed } }).then(() => "valid", (e: { stderr: string }) => e.stderr);
      expect({ file, check }).toEqual({ file, check: "valid" });
    }
  });

  it("makes the seeds a federation file does not give, owner-readable only, and keeps them on the next run", async () => {
    const federation = join(dir, "fed.json");
    await writeFile(federation, JSON.stringify({ hub: { nodes: [{ name: "h1", host: "127.0.0.1" }] }, homeservers: { alpha: { topology: "shared" }, beta: { topology: "bridged" } } }));
    const out = join(dir, "made");
    expect((await fedrelay(["nats-config", "--federation", federation, "--out", out])).code).toBe(0);
    const seeds = ["hub/admin.seed", "homeservers/alpha/nkey.seed", "homeservers/beta/nkey.seed", "homeservers/beta/nats-server.conf"];
    const first = new Map<string, string>();
    for (const f of seeds) {
      expect({ f, mode: (await stat(join(out, f))).mode & 0o777 }).toEqual({ f, mode: 0o600 });
      first.set(f, await readFile(join(out, f), "utf8"));
    }
    expect((await fedrelay(["nats-config", "--federation", federation, "--out", out])).code).toBe(0);
    for (const f of seeds) expect(await readFile(join(out, f), "utf8")).toBe(first.get(f));
    const alpha = JSON.parse(await readFile(join(out, "homeservers/alpha/fedrelay.json"), "utf8")) as { nats: { nkeySeedFile: string } };
    expect(alpha.nats.nkeySeedFile).toBe(join(out, "homeservers/alpha/nkey.seed"));
  });

  it("refuses a bad federation file in one line naming the key, exit 2", async () => {
    const federation = join(dir, "bad.json");
    await writeFile(federation, JSON.stringify({ hub: { nodes: [{ name: "h 1", host: "x" }] }, homeservers: { alpha: { topology: "shared" } } }));
    const result = await fedrelay(["nats-config", "--federation", federation, "--out", join(dir, "nope")]);
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^fedrelay nats-config: federation file .*bad\.json: hub\.nodes\.0\.name: [^\n]+\n$/);
    // A per-sender quota one sender could fill an inbox with.
    await writeFile(federation, JSON.stringify({ hub: { nodes: [{ name: "h1", host: "x" }] }, streams: { maxMessagesPerSender: 100_000 }, homeservers: { alpha: { topology: "shared" } } }));
    const quota = await fedrelay(["nats-config", "--federation", federation, "--out", join(dir, "nope")]);
    expect(quota.code).toBe(2);
    expect(quota.stderr).toMatch(/^fedrelay nats-config: federation file .*bad\.json: streams\.maxMessagesPerSender: maxMessagesPerSender 100000 × \(maxMessageBytes 1048576 \+ 4096\) = [^\n]+; at most 2040\n$/);
  });
});

describe("fedrelay nats-provision", () => {
  let hub: LocalNats;
  let federation: string;
  let out: string;

  beforeAll(async () => {
    out = join(dir, "provisioned");
    federation = join(dir, "provision.json");
    const [clientPort, leafnodePort] = await Promise.all([freePort(), freePort()]);
    await writeFile(federation, JSON.stringify({
      hub: { nodes: [{ name: "h1", host: "127.0.0.1", listen: "127.0.0.1", clientPort, leafnodePort }], storeDir: join(dir, "provision-js") },
      homeservers: { alpha: { topology: "shared" }, beta: { topology: "shared" } },
    }));
    expect((await fedrelay(["nats-config", "--federation", federation, "--out", out])).code).toBe(0);
    hub = await startLocalNats({ config: await readFile(join(out, "hub/h1.conf"), "utf8") });
  });

  afterAll(async () => {
    await hub?.stop();
  });

  const provision = (): Promise<{ code: number; stdout: string; stderr: string }> =>
    fedrelay(["nats-provision", "--federation", federation, "--server", hub.url, "--seed-file", join(out, "hub/admin.seed")]);

  it("creates every homeserver's streams and consumers, then finds nothing to do, then restores what was changed", async () => {
    const first = await provision();
    expect(first.code).toBe(0);
    expect(first.stdout.split("\n").filter(Boolean)).toEqual([
      // One inbox consumer per member sending to it, itself included.
      "alpha: created stream FEDRELAY_IN_alpha",
      "alpha: created consumer FEDRELAY_IN_alpha/receiver_alpha", "alpha: created consumer FEDRELAY_IN_alpha/receiver_beta",
      "alpha: created stream FEDRELAY_REPORTS_alpha", "alpha: created consumer FEDRELAY_REPORTS_alpha/reports",
      "beta: created stream FEDRELAY_IN_beta",
      "beta: created consumer FEDRELAY_IN_beta/receiver_alpha", "beta: created consumer FEDRELAY_IN_beta/receiver_beta",
      "beta: created stream FEDRELAY_REPORTS_beta", "beta: created consumer FEDRELAY_REPORTS_beta/reports",
      "2 of 2 homeservers as they should be",
    ]);
    expect((await provision()).stdout).toBe("2 of 2 homeservers as they should be\n");

    const seed = (await readFile(join(out, "hub/admin.seed"), "utf8")).trim();
    const nc = await connect({ servers: hub.url, authenticator: nkeyAuthenticator(new TextEncoder().encode(seed)) });
    try {
      // Each homeserver's streams are in an account of their own, which the admin reaches under a prefix each.
      const [alpha, beta] = await Promise.all([adminManager(nc, "alpha"), adminManager(nc, "beta")]);
      await beta.streams.update("FEDRELAY_IN_beta", { max_age: nanos(3_600_000) });
      await alpha.consumers.delete("FEDRELAY_REPORTS_alpha", "reports");
      const third = await provision();
      expect(third.stdout).toMatch(/^alpha: created consumer FEDRELAY_REPORTS_alpha\/reports\nbeta: restored stream FEDRELAY_IN_beta \(max_age: 3600000000000 \(expected 0\)\)\n2 of 2/);
      expect((await beta.streams.info("FEDRELAY_IN_beta")).config.max_age).toBe(0);
      expect(await alpha.streams.names().next()).toEqual(expect.not.arrayContaining(["FEDRELAY_IN_beta"]));
    } finally {
      await nc.close();
    }
  });

  it("with a seed the hub does not know exits 1 in one line naming the server", async () => {
    const stranger = join(dir, "stranger.seed");
    await writeFile(stranger, new TextDecoder().decode(createUser().getSeed()));
    const result = await fedrelay(["nats-provision", "--federation", federation, "--server", hub.url, "--seed-file", stranger]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(new RegExp(`^fedrelay nats-provision: NATS ${hub.url.replaceAll(".", "\\.")} refused nats\\.nkeySeed: authorization failed\\n$`));
  });
});
