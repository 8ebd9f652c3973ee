/** `fedrelay <command>`: one function per subcommand. I/O comes in through `CliIo`. */
import { join, resolve } from "node:path";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { pino, type Logger } from "pino";
import { loadConfig, type RelayConfig } from "./config.ts";
import { isRelayError, RelayError } from "./errors.ts";
import { generateSigningJwk } from "./protocol/keys.ts";
import { createRelay, type RelayRoles } from "./relay.ts";
import { createClientTokens } from "./client-tokens.ts";
import { isClientId, splitKid } from "./protocol/names.ts";
import { issueCapabilityFor, listCapabilitiesOf, revokeCapabilityFor } from "./operations/capabilities.ts";
import { evidenceOf } from "./operations/evidence.ts";
import { signingKeyAt } from "./keys/own-keys.ts";
import { ownKeyRows, rotateOwnKey } from "./store/own-keys.ts";
import { revokePeerKey } from "./store/peer-keys.ts";
import { oneOf, type Operation } from "./operations/operation.ts";
import { putRateLimit, removeRateLimit, showRateLimits } from "./operations/rate-limits.ts";
import { putServerRule, removeServerRule, setPolicyMode, showPolicy } from "./operations/server-policy.ts";
import { registerClient } from "./store/clients.ts";
import { listTokenKeys, revokeTokenKey, rotateTokenKeys } from "./store/client-token-keys.ts";
import { createDb, type Db } from "./store/db.ts";
import { mergeRateLimits } from "./store/server-policy.ts";
import { mergePolicies } from "./policy/server-rules.ts";
import { migrate } from "./store/migrate.ts";
import { parseFederation } from "./federation/federation.ts";
import { federationKeys } from "./federation/keys.ts";
import { natsConfigFiles } from "./federation/nats-config.ts";
import { provisionHub } from "./federation/provision.ts";
import { connectNats } from "./transport/connection.ts";

export interface CliIo {
  readonly env: Readonly<Record<string, string | undefined>>;
  readonly stdout: (line: string) => void;
  readonly stderr: (line: string) => void;
  readonly readFile: (path: string) => Promise<string>;
  /** Creates the file with owner-only permissions; fails if it exists. */
  readonly writeSecretFile: (path: string, text: string) => Promise<void>;
  /** Writes (or replaces) a file, creating its folder; `secret`: readable by its owner only. */
  readonly writeFile: (path: string, text: string, options: { secret: boolean }) => Promise<void>;
  /** Resolves on the first SIGTERM/SIGINT. */
  readonly shutdownSignal: Promise<void>;
}

interface Command {
  readonly summary: string;
  readonly usage: string;
  readonly options: NonNullable<ParseArgsConfig["options"]>;
  run(args: { values: Record<string, string | boolean | undefined>; positionals: string[] }, io: CliIo): Promise<number>;
}

const configOption = { config: { type: "string", short: "c" } } as const;
const CONFIG_HELP = "  -c, --config FILE   JSON config file (default: $FEDRELAY_CONFIG); FEDRELAY_<SECTION>__<KEY> env vars override it";

async function readConfig(values: Record<string, unknown>, io: CliIo): Promise<RelayConfig> {
  const path = (values.config as string | undefined) ?? io.env.FEDRELAY_CONFIG;
  const file = path === undefined ? undefined : { path, text: await readOrFail(io, path, "config file") };
  let config = loadConfig({ env: io.env, ...(file ? { file } : {}) });
  // Where `keygen` writes by default: a fresh checkout runs after keygen with no config at all.
  const keyFile = config.keys.signingKeyFile ?? (config.keys.signingKey ? undefined : await defaultKeyFile(io, config.homeserver));
  const overrides: { keys?: object; nats?: Record<string, string> } = {};
  if (keyFile && !config.keys.signingKey) {
    const text = await readOrFail(io, keyFile, "keys.signingKeyFile");
    try {
      overrides.keys = { signingKey: JSON.parse(text) as object };
    } catch {
      throw new RelayError("config_invalid", `config key keys.signingKeyFile: ${keyFile} is not JSON`);
    }
  }
  // The NATS credential files, read once here: a missing or unreadable one fails at start, naming it.
  const { nkeySeedFile, credsFile, tls } = config.nats;
  if (nkeySeedFile !== undefined) (overrides.nats ??= {}).nkeySeed = (await readOrFail(io, nkeySeedFile, "nats.nkeySeedFile")).trim();
  if (credsFile !== undefined) (overrides.nats ??= {}).creds = await readOrFail(io, credsFile, "nats.credsFile");
  for (const [key, path] of Object.entries(tls ?? {})) if (path !== undefined) await readOrFail(io, path, `nats.tls.${key}`);
  if (overrides.keys || overrides.nats) config = loadConfig({ env: io.env, ...(file ? { file } : {}), overrides });
  return config;
}

async function defaultKeyFile(io: CliIo, homeserver: string): Promise<string | undefined> {
  const path = `keys/${homeserver}.jwk.json`;
  return io.readFile(path).then(() => path, () => undefined);
}

async function readOrFail(io: CliIo, path: string, what: string): Promise<string> {
  try {
    return await io.readFile(path);
  } catch (cause) {
    throw new RelayError("config_invalid", `cannot read ${what} ${path}: ${(cause as NodeJS.ErrnoException).code ?? (cause as Error).message}`, { cause });
  }
}

/** Opens the homeserver's database (migrated) for one operator command. */
async function withDb(values: Record<string, unknown>, io: CliIo, fn: (db: Db, config: RelayConfig) => Promise<number>): Promise<number> {
  const config = await readConfig(values, io);
  const db = createDb(config.postgres);
  try {
    await migrate(db.pool, config.postgres.schema);
    return await fn(db, config);
  } finally {
    await db.close();
  }
}

function logger(config: RelayConfig): Logger {
  return pino({ level: config.log.level });
}

async function runRelay(roles: RelayRoles, values: Record<string, unknown>, io: CliIo): Promise<number> {
  const config = await readConfig(values, io);
  const relay = createRelay(config, roles, { log: logger(config) });
  try {
    await relay.start();
  } catch (err) {
    await relay.close().catch(() => undefined);
    throw err;
  }
  const operator = relay.operatorUrl === relay.url ? "" : ` (metrics and readiness on ${relay.operatorUrl})`;
  io.stderr(`fedrelay: ${config.homeserver} ${roles.api ? "serving" : "worker"} on ${relay.url}${operator}`);
  await io.shutdownSignal;
  // Readiness turns false at once; batches in hand commit and are acknowledged.
  const deadline = config.worker.shutdownTimeoutSeconds * 1000;
  const closed = await Promise.race([
    relay.close().then(() => true),
    new Promise<false>((resolve) => setTimeout(() => resolve(false), deadline).unref()),
  ]);
  if (!closed) {
    io.stderr(`fedrelay: shutdown took over ${config.worker.shutdownTimeoutSeconds} s; exiting (unacknowledged events will be redelivered)`);
    return 1;
  }
  return 0;
}

/** An operator command whose input is checked: what is left is to run it and print the outcome. */
type CheckedCommand = (db: Db, config: RelayConfig, io: CliIo) => Promise<void>;

/** The command is checked before this is called: a typo must not touch the database. */
function runOperation(values: Record<string, unknown>, io: CliIo, command: CheckedCommand): Promise<number> {
  return withDb(values, io, async (db, config) => {
    await command(db, config, io);
    return 0;
  });
}

function printing<T>(operation: Operation<T>, line: (result: T) => string): CheckedCommand {
  return async (db, _config, io) => io.stdout(line(await operation(db)));
}

const json = (value: unknown): string => JSON.stringify(value, null, 2);

function policyCommand([action, pattern]: string[]): CheckedCommand {
  switch (action) {
    case "list":
      return async (db, config, io) => io.stdout(json(await showPolicy((runtime) => ({
        ...mergePolicies(config.policy, runtime),
        configured: { mode: config.policy.mode, allow: config.policy.allow, deny: config.policy.deny },
      }))(db)));
    case "allow":
    case "deny":
      return printing(putServerRule(pattern, action), (rule) => `${rule.action} ${rule.pattern}`);
    case "remove":
      return printing(removeServerRule(pattern), () => `removed ${pattern}`);
    case "mode":
      return printing(setPolicyMode(pattern), ({ mode }) => `mode ${mode}`);
    default:
      throw new RelayError("bad_request", `policy takes list, allow, deny, remove or mode, got ${JSON.stringify(action ?? "")}`);
  }
}

function rateLimitCommand([action, scope, name, rate, burst]: string[]): CheckedCommand {
  switch (action) {
    case "list":
      return async (db, config, io) => io.stdout(json(await showRateLimits((runtime) => mergeRateLimits(config.rateLimits, runtime))(db)));
    case "set":
      return printing(putRateLimit(scope, name, { rate: Number(rate), burst: Number(burst) }), (limit) => `${scope} ${name}: ${limit.rate}/s, burst ${limit.burst}`);
    case "remove":
      return printing(removeRateLimit(scope, name), () => `removed ${scope} ${name}`);
    default:
      throw new RelayError("bad_request", `ratelimit takes list, set or remove, got ${JSON.stringify(action ?? "")}`);
  }
}

function capabilityCommand([action, arg, group]: string[]): CheckedCommand {
  switch (action) {
    case "issue": {
      const issue = issueCapabilityFor(arg, group);
      return async (db, _config, io) => {
        const cap = await issue(db);
        io.stderr(`fedrelay: capability ${cap.id} for ${cap.client} in ${cap.group}; the secret (shown once):`);
        io.stdout(cap.capability);
      };
    }
    case "list":
      return printing(listCapabilitiesOf(arg), ({ capabilities }) => json(capabilities));
    case "revoke":
      // An operator may revoke any client's.
      return printing(revokeCapabilityFor(arg), () => `revoked ${arg}`);
    default:
      throw new RelayError("bad_request", `capability takes issue, list or revoke, got ${JSON.stringify(action ?? "")}`);
  }
}

export const COMMANDS: Readonly<Record<string, Command>> = {
  keygen: {
    summary: "write a new Ed25519 signing key (private JWK) for a homeserver",
    usage: "fedrelay keygen --homeserver NAME [--key-id ID] [--out FILE]\n  --homeserver NAME   this homeserver's name (kid is NAME#ID)\n  --key-id ID         key id (default: the date, e.g. 2026-11-25)\n  --out FILE          where to write it (default: keys/NAME.jwk.json); never overwritten",
    options: { homeserver: { type: "string" }, "key-id": { type: "string" }, out: { type: "string" } },
    async run({ values }, io) {
      const homeserver = values.homeserver as string | undefined;
      if (!homeserver) throw new RelayError("bad_request", "keygen needs --homeserver NAME");
      const keyId = (values["key-id"] as string | undefined) ?? new Date().toISOString().slice(0, 10);
      const jwk = await generateSigningJwk(homeserver, keyId, Math.floor(Date.now() / 1000));
      const out = (values.out as string | undefined) ?? `keys/${homeserver}.jwk.json`;
      await io.writeSecretFile(out, `${JSON.stringify(jwk, null, 2)}\n`);
      const { d: _d, ...publicJwk } = jwk;
      io.stderr(`fedrelay: wrote ${out} (kid ${jwk.kid}); its public key, for peers:`);
      io.stdout(JSON.stringify(publicJwk));
      return 0;
    },
  },
  migrate: {
    summary: "apply pending database migrations",
    usage: `fedrelay migrate [--config FILE]\n${CONFIG_HELP}`,
    options: configOption,
    async run({ values }, io) {
      const config = await readConfig(values, io);
      const db = createDb(config.postgres);
      try {
        const applied = await migrate(db.pool, config.postgres.schema);
        io.stdout(applied.length ? `applied ${applied.join(", ")} to schema ${config.postgres.schema}` : `schema ${config.postgres.schema} is up to date`);
      } finally {
        await db.close();
      }
      return 0;
    },
  },
  serve: {
    summary: "run the HTTP API and a receiver worker",
    usage: `fedrelay serve [--config FILE] [--no-worker]\n${CONFIG_HELP}\n  --no-worker         API only; run receivers with \`fedrelay worker\``,
    options: { ...configOption, "no-worker": { type: "boolean" } },
    run: ({ values }, io) => runRelay({ api: true, worker: !values["no-worker"] }, values, io),
  },
  worker: {
    summary: "run a receiver worker (scale by running several); serves /metrics, /healthz, /readyz",
    usage: `fedrelay worker [--config FILE]\n${CONFIG_HELP}`,
    options: configOption,
    run: ({ values }, io) => runRelay({ api: false, worker: true }, values, io),
  },
  "client-add": {
    summary: "register a local client and print a bearer token for it",
    usage: `fedrelay client-add CLIENT_ID [--config FILE]\n${CONFIG_HELP}`,
    options: configOption,
    async run({ values, positionals }, io) {
      const id = positionals[0];
      if (!isClientId(id)) throw new RelayError("bad_request", `client-add needs a client id ([A-Za-z0-9._~:@/-], 1–255), got ${JSON.stringify(id ?? "")}`);
      return withDb(values, io, async (db, config) => {
        const created = await registerClient(db, id);
        const tokens = createClientTokens({ self: config.homeserver, db, ttlSeconds: config.http.clientTokenTtlSeconds, now: () => Date.now() / 1000 });
        const { token } = await tokens.mint(id);
        io.stderr(`fedrelay: client ${id} ${created ? "registered" : "already registered"}; token:`);
        io.stdout(token);
        return 0;
      });
    },
  },
  evidence: {
    summary: "print the evidence of a stored event: its token, the key that verified it, a fresh verification",
    usage: `fedrelay evidence EVENT_ID [--from HOMESERVER] [--bundle FILE] [--config FILE]
  EVENT_ID            the event's jti (what a client sees as \`event\`); one that begins with - goes
                      last, after --: fedrelay evidence --bundle FILE -- -Xy3…
  --from HOMESERVER   its sender, when several senders used that id
  --bundle FILE       also write a self-contained JSON bundle (token, public key, its thumbprint, body
                      hash, when received) that any JOSE library verifies without fedrelay
Exit 1 when the stored token no longer verifies with the key that verified it.
${CONFIG_HELP}`,
    options: { ...configOption, from: { type: "string" }, bundle: { type: "string" } },
    async run({ values, positionals }, io) {
      const find = evidenceOf(positionals[0], values.from as string | undefined);
      return withDb(values, io, async (db, config) => {
        const evidence = await find(db, config.homeserver);
        if (evidence.kept === "record" && values.bundle !== undefined) {
          throw new RelayError("not_found", `event ${evidence.jti} was delivered to no one: only a record of it was kept (its token's SHA-256), so there is no bundle to write`);
        }
        io.stdout(json(evidence));
        if (evidence.kept === "record") return 0;
        if (values.bundle !== undefined) await io.writeFile(values.bundle as string, `${json(evidence.bundle)}\n`, { secret: false });
        if (evidence.verification.ok) return 0;
        io.stderr(`fedrelay evidence: event ${evidence.bundle.jti}'s stored token does not verify: ${evidence.verification.detail}`);
        return 1;
      });
    },
  },
  keys: {
    summary: "list or rotate this homeserver's federation signing keys, or revoke a peer's (no restart: every process follows within a second)",
    usage: `fedrelay keys list | rotate [--overlap SECONDS] | revoke-peer KID [--config FILE]
  list       every key: when it signs from, when it was retired, which signs now
  rotate     a new key, served to peers at once and signing after --overlap (default 600 s, so
             peers fetch it before it is used); the key signing until then is retired at that
             moment and served with its exp forever, so the events it signed stay provable
  revoke-peer  a peer's key that was compromised: every process refuses it within a second,
             whatever its events' dates; the stored events it verified show the revocation
             in their evidence (fedrelay evidence)
${CONFIG_HELP}`,
    options: { ...configOption, overlap: { type: "string" } },
    async run({ values, positionals }, io) {
      const action = oneOf(["list", "rotate", "revoke-peer"], positionals[0], "keys action");
      const kid = positionals[1];
      if (action === "revoke-peer" && (kid === undefined || splitKid(kid) === undefined)) {
        throw new RelayError("bad_request", `keys revoke-peer needs a kid (<homeserver>#<key-id>), got ${JSON.stringify(kid ?? "")}`);
      }
      const overlap = values.overlap === undefined ? 600 : Number(values.overlap);
      if (!Number.isInteger(overlap) || overlap < 0 || overlap > 30 * 86_400) throw new RelayError("bad_request", `--overlap must be whole seconds from 0 to 2592000, got ${JSON.stringify(values.overlap)}`);
      return withDb(values, io, async (db, config) => {
        const now = Date.now() / 1000;
        if (action === "revoke-peer") {
          const revoked = await revokePeerKey(db, kid!);
          io.stdout(`${revoked.kid} (key ${revoked.thumbprint}) revoked at ${revoked.revokedAt.toISOString()}; ${revoked.storedEvents} stored events were verified with it`);
          return 0;
        }
        if (action === "rotate") {
          const { kid, signFrom, retired } = await rotateOwnKey(db, config.homeserver, overlap, now);
          io.stdout(`${kid} is served now and signs from ${signFrom.toISOString()}${retired.length ? `; retired then: ${retired.join(", ")}` : ""}`);
          return 0;
        }
        const rows = await ownKeyRows(db);
        const signing = signingKeyAt(rows, now)?.kid;
        io.stdout(json(rows.map((r) => ({
          kid: r.kid, signFrom: new Date(r.signFrom * 1000).toISOString(), retiredAt: r.retiredAt === null ? null : new Date(r.retiredAt * 1000).toISOString(), signing: r.kid === signing,
        }))));
        return 0;
      });
    },
  },
  "token-keys": {
    summary: "list, rotate or revoke the keys client tokens are signed with (not the federation key)",
    usage: `fedrelay token-keys list | rotate | revoke KEY_ID [--config FILE]
  rotate   a new key signs from now on; tokens of the old one stay valid until they expire (hygiene:
           a secret someone has seen can still date tokens before the rotation; revoke it instead)
  revoke   every token signed with KEY_ID is refused from now on (a secret that may have been seen)
${CONFIG_HELP}`,
    options: configOption,
    async run({ values, positionals }, io) {
      const [action, id] = positionals;
      if (!["list", "rotate", "revoke"].includes(action ?? "")) throw new RelayError("bad_request", `token-keys takes list, rotate or revoke, got ${JSON.stringify(action ?? "")}`);
      if (action === "revoke" && !id) throw new RelayError("bad_request", "token-keys revoke needs KEY_ID");
      return withDb(values, io, async (db) => {
        switch (action) {
          case "list":
            io.stdout(json(await listTokenKeys(db)));
            return 0;
          case "rotate": {
            const { id: fresh, retired } = await rotateTokenKeys(db);
            io.stdout(`signing with ${fresh}${retired.length ? `; retired ${retired.join(", ")}` : ""}`);
            return 0;
          }
          default:
            if (!(await revokeTokenKey(db, id!))) throw new RelayError("not_found", `no unrevoked token key ${id}`);
            io.stdout(`revoked ${id}`);
            return 0;
        }
      });
    },
  },
  policy: {
    summary: "show or change the server-level policy (applies to every process within a second)",
    usage: `fedrelay policy list | allow PATTERN | deny PATTERN | remove PATTERN | mode open|allowlist [--config FILE]\n  PATTERN is a homeserver name or *.suffix\n${CONFIG_HELP}`,
    options: configOption,
    run: ({ values, positionals }, io) => runOperation(values, io, policyCommand(positionals)),
  },
  ratelimit: {
    summary: "show or override delivery rate limits for a homeserver or a client (applies within a second)",
    usage: `fedrelay ratelimit list | set server|client NAME RATE BURST | remove server|client NAME [--config FILE]\n  RATE is deliveries per second, BURST the bucket size\n${CONFIG_HELP}`,
    options: configOption,
    run: ({ values, positionals }, io) => runOperation(values, io, rateLimitCommand(positionals)),
  },
  capability: {
    summary: "issue, list or revoke a client's delivery capabilities",
    usage: `fedrelay capability issue CLIENT GROUP | list CLIENT | revoke ID [--config FILE]\n${CONFIG_HELP}`,
    options: configOption,
    run: ({ values, positionals }, io) => runOperation(values, io, capabilityCommand(positionals)),
  },
  "nats-config": {
    summary: "write a NATS hub's configuration and each homeserver's credentials from a federation file",
    usage: "fedrelay nats-config --federation FILE --out DIR\n  --federation FILE  the federation: hub nodes, homeservers and their topology (docs/operations.md, \"Federating\")\n  --out DIR          where to write hub/*.conf, hub/admin.seed and homeservers/NAME/ (seeds already there are kept)",
    options: { federation: { type: "string" }, out: { type: "string" } },
    async run({ values }, io) {
      const path = values.federation as string | undefined;
      const out = values.out as string | undefined;
      if (!path || !out) throw new RelayError("bad_request", "nats-config needs --federation FILE and --out DIR");
      const fed = parseFederation(await readOrFail(io, path, "federation file"), path);
      const existing = async (file: string): Promise<string | undefined> => io.readFile(join(out, file)).catch(() => undefined);
      const seeds = new Map<string, string>();
      for (const name of Object.keys(fed.homeservers)) {
        const seed = await existing(`homeservers/${name}/nkey.seed`);
        if (seed !== undefined) seeds.set(name, seed);
      }
      const admin = await existing("hub/admin.seed");
      const keys = federationKeys(fed, { ...(admin === undefined ? {} : { admin }), homeservers: seeds });
      // A seed made here is read where it was written; one the homeserver keeps, where its operator puts it.
      const files = natsConfigFiles(fed, keys, (name) =>
        keys.homeservers.get(name)?.seed === undefined ? "/etc/fedrelay/nkey.seed" : resolve(out, `homeservers/${name}/nkey.seed`));
      for (const f of files) await io.writeFile(join(out, f.path), f.text, { secret: f.secret });
      io.stderr(`fedrelay: wrote ${files.length} files for ${Object.keys(fed.homeservers).length} homeservers and ${fed.hub.nodes.length} hub nodes; reload the hub (nats-server --signal reload), then run fedrelay nats-provision`);
      for (const f of files) io.stdout(join(out, f.path));
      return 0;
    },
  },
  "nats-provision": {
    summary: "create, or put back, every homeserver's streams and consumers on a NATS hub",
    usage: "fedrelay nats-provision --federation FILE --server URL --seed-file FILE [--watch SECONDS]\n  --server URL       a hub node (nats://host:4222)\n  --seed-file FILE   the hub admin's nkey seed (hub/admin.seed from nats-config)\n  --watch SECONDS    keep checking this often, until SIGTERM",
    options: { federation: { type: "string" }, server: { type: "string" }, "seed-file": { type: "string" }, watch: { type: "string" } },
    async run({ values }, io) {
      const path = values.federation as string | undefined;
      const server = values.server as string | undefined;
      const seedFile = values["seed-file"] as string | undefined;
      const watch = values.watch === undefined ? undefined : Number(values.watch);
      if (!path || !server || !seedFile) throw new RelayError("bad_request", "nats-provision needs --federation FILE, --server URL and --seed-file FILE");
      if (watch !== undefined && !(Number.isInteger(watch) && watch >= 1)) throw new RelayError("bad_request", "--watch takes whole seconds, at least 1");
      const fed = parseFederation(await readOrFail(io, path, "federation file"), path);
      const seed = (await readOrFail(io, seedFile, "--seed-file")).trim();
      const nc = await connectNats({ ...loadConfig().nats, servers: [server], nkeySeed: seed }, "fedrelay nats-provision");
      try {
        for (;;) {
          const results = await provisionHub(nc, fed);
          for (const r of results) {
            for (const what of r.repaired) io.stdout(`${r.homeserver}: ${what}`);
            for (const problem of r.problems) io.stderr(`fedrelay nats-provision: ${r.homeserver}: ${problem}`);
          }
          const failed = results.filter((r) => r.problems.length > 0).length;
          if (watch === undefined) {
            io.stdout(`${results.length - failed} of ${results.length} homeservers as they should be`);
            return failed === 0 ? 0 : 1;
          }
          const stop = await Promise.race([io.shutdownSignal.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), watch * 1000).unref())]);
          if (stop) return failed === 0 ? 0 : 1;
        }
      } finally {
        await nc.close();
      }
    },
  },
  demo: {
    summary: "run three homeservers on this machine and fan out a few messages",
    usage: "fedrelay demo [--messages N]\n  --messages N   messages alpha's group sends (default 3)\n  Starts its own NATS hub (nats-config's output) and a bridged homeserver's server; Postgres from DATABASE_URL or the default.",
    options: { messages: { type: "string" } },
    async run({ values }, io) {
      const { runDemo } = await import("./demo.ts");
      const messages = Number(values.messages ?? 3);
      if (!Number.isInteger(messages) || messages < 1 || messages > 1000) throw new RelayError("bad_request", "--messages must be a whole number from 1 to 1000");
      await runDemo({ env: io.env, out: io.stdout, messages });
      return 0;
    },
  },
};

function helpText(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((n) => n.length));
  return [
    "fedrelay: federation relay for messaging homeservers",
    "",
    "usage: fedrelay <command> [options]   (fedrelay <command> --help for its options)",
    "",
    ...Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}  ${c.summary}`),
  ].join("\n");
}

/** Returns the exit code: 0 ok, 1 runtime failure, 2 bad usage or config. */
export async function runCli(argv: readonly string[], io: CliIo): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "--help" || name === "-h" || name === "help") {
    io.stdout(helpText());
    return name === undefined ? 2 : 0;
  }
  const command = COMMANDS[name];
  if (!command) {
    io.stderr(`fedrelay: unknown command "${name}" (try fedrelay --help)`);
    return 2;
  }
  let parsed;
  try {
    parsed = parseArgs({ args: [...rest], options: { ...command.options, help: { type: "boolean", short: "h" } }, allowPositionals: true, strict: true });
  } catch (err) {
    io.stderr(`fedrelay ${name}: ${(err as Error).message.split("\n")[0]}`);
    return 2;
  }
  if (parsed.values.help) {
    io.stdout(`${command.summary}\n\nusage: ${command.usage}`);
    return 0;
  }
  try {
    return await command.run(parsed as never, io);
  } catch (err) {
    const message = (err as Error).message.split("\n")[0];
    io.stderr(`fedrelay ${name}: ${message}`);
    if (isRelayError(err) && (err.code === "bad_request" || err.code === "config_invalid")) return 2;
    return 1;
  }
}
