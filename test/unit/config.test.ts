import { describe, expect, it } from "vitest";
import { configFromEnv, loadConfig, type ConfigSources, type RelayConfig } from "../../src/config.ts";
import { RelayError } from "../../src/errors.ts";
import { DEFAULT_EVENT_LIMITS } from "../../src/protocol/claims.ts";

/** Runs loadConfig and returns the RelayError it throws (failing the test if it does not). */
function configError(sources: ConfigSources): RelayError {
  let config: RelayConfig | undefined;
  try {
    config = loadConfig(sources);
  } catch (err) {
    expect(err).toBeInstanceOf(RelayError);
    return err as RelayError;
  }
  expect.fail(`loadConfig accepted ${JSON.stringify(sources)} and returned ${JSON.stringify(config)}`);
}

function file(value: unknown, path = "/etc/fedrelay/config.json"): { path: string; text: string } {
  return { path, text: JSON.stringify(value) };
}

describe("loadConfig defaults", () => {
  it("works with no input at all", () => {
    const config = loadConfig();
    expect(config.homeserver).toBe("localhost");
    expect(config.nats.servers).toEqual(["nats://127.0.0.1:4222"]);
    expect(config.postgres.url).toBe("postgresql://postgres@127.0.0.1:5432/postgres");
    expect(config.postgres.poolSize).toBe(10);
    expect(config.http.host).toBe("127.0.0.1");
    expect(config.http.port).toBe(8080);
    expect(config.http.serviceToken).toBeUndefined();
    expect(config.keys.retired).toEqual([]);
    expect(config.peers).toEqual({});
    expect(config.log.level).toBe("info");
    expect(config.worker.consumer).toBe("receiver");
  });

  it("gives the same result for no sources, empty sources and an empty file", () => {
    const none = loadConfig();
    expect(loadConfig({})).toEqual(none);
    expect(loadConfig({ env: {}, overrides: {} })).toEqual(none);
    expect(loadConfig({ file: { path: "empty.json", text: "{}" } })).toEqual(none);
  });

  it("defaults the event limits to the protocol's (DESIGN §5)", () => {
    expect(loadConfig().limits).toEqual({ ...DEFAULT_EVENT_LIMITS });
    expect(loadConfig().limits).toEqual({
      maxMessageBytes: 1024 * 1024,
      maxBodyBytes: 64 * 1024,
      maxFutureSkewSeconds: 300,
      maxLifetimeSeconds: 7 * 24 * 3600,
    });
  });

  it("defaults the postgres schema to fedrelay_<subject token>", () => {
    expect(loadConfig().postgres.schema).toBe("fedrelay_localhost");
    expect(loadConfig({ overrides: { homeserver: "beta.example.org" } }).postgres.schema).toBe("fedrelay_beta_example_org");
  });

  it("keeps an explicit postgres schema", () => {
    const config = loadConfig({ overrides: { homeserver: "beta.example.org", postgres: { schema: "custom_schema" } } });
    expect(config.postgres.schema).toBe("custom_schema");
    expect(config.postgres.url).toBe("postgresql://postgres@127.0.0.1:5432/postgres");
  });

  it("derives a valid schema name (no hyphen) for a homeserver with hyphens", () => {
    const schema = loadConfig({ overrides: { homeserver: "my-server.example" } }).postgres.schema;
    expect(schema).toMatch(/^[a-z_][a-z0-9_]{0,62}$/);
    expect(schema.startsWith("fedrelay_")).toBe(true);
  });

  it("gives homeservers that differ only in '-' versus '.' distinct default schemas (they may share a database)", () => {
    const dotted = loadConfig({ overrides: { homeserver: "a.b.example" } }).postgres.schema;
    const hyphenated = loadConfig({ overrides: { homeserver: "a-b.example" } }).postgres.schema;
    expect(dotted).not.toBe(hyphenated);
  });

  it("derives a default schema within Postgres' 63-byte identifier limit for a long homeserver name", () => {
    const long = `${"a".repeat(60)}.example`;
    const schema = loadConfig({ overrides: { homeserver: long } }).postgres.schema;
    expect(schema).toMatch(/^[a-z_][a-z0-9_]{0,62}$/);
  });
});

describe("loadConfig from the environment", () => {
  it("FEDRELAY_HTTP__PORT=9000 sets http.port to the number 9000", () => {
    const config = loadConfig({ env: { FEDRELAY_HTTP__PORT: "9000" } });
    expect(config.http.port).toBe(9000);
    expect(config.http.host).toBe("127.0.0.1");
  });

  it("FEDRELAY_HOMESERVER sets the homeserver and with it the default schema", () => {
    const config = loadConfig({ env: { FEDRELAY_HOMESERVER: "beta.example.org" } });
    expect(config.homeserver).toBe("beta.example.org");
    expect(config.postgres.schema).toBe("fedrelay_beta_example_org");
  });

  it("keeps FEDRELAY_HOMESERVER a string even when it parses as JSON", () => {
    expect(loadConfig({ env: { FEDRELAY_HOMESERVER: "123" } }).homeserver).toBe("123");
  });

  it("keeps FEDRELAY_POSTGRES__SCHEMA a string even when it parses as JSON", () => {
    expect(loadConfig({ env: { FEDRELAY_POSTGRES__SCHEMA: "null" } }).postgres.schema).toBe("null");
  });

  it("NATS_URL is a comma-separated list of servers, trimmed", () => {
    const config = loadConfig({ env: { NATS_URL: "nats://n1:4222, nats://n2:4222 ,nats://n3:4222" } });
    expect(config.nats.servers).toEqual(["nats://n1:4222", "nats://n2:4222", "nats://n3:4222"]);
  });

  it("NATS_URL with a single server gives a one-element list", () => {
    expect(loadConfig({ env: { NATS_URL: "nats://only:4222" } }).nats.servers).toEqual(["nats://only:4222"]);
  });

  it("DATABASE_URL sets postgres.url and keeps the other postgres defaults", () => {
    const config = loadConfig({ env: { DATABASE_URL: "postgresql://u:p@db:5432/relay" } });
    expect(config.postgres.url).toBe("postgresql://u:p@db:5432/relay");
    expect(config.postgres.poolSize).toBe(10);
    expect(config.postgres.schema).toBe("fedrelay_localhost");
  });

  it("maps UPPER_SNAKE keys to camelCase (FEDRELAY_HTTP__SERVICE_TOKEN, FEDRELAY_POSTGRES__POOL_SIZE)", () => {
    const config = loadConfig({
      env: {
        FEDRELAY_HTTP__SERVICE_TOKEN: "a-long-enough-service-secret",
        FEDRELAY_POSTGRES__POOL_SIZE: "25",
        FEDRELAY_LIMITS__MAX_BODY_BYTES: "1024",
        FEDRELAY_LOG__LEVEL: "debug",
      },
    });
    expect(config.http.serviceToken).toBe("a-long-enough-service-secret");
    expect(config.postgres.poolSize).toBe(25);
    expect(config.limits.maxBodyBytes).toBe(1024);
    expect(config.log.level).toBe("debug");
  });

  it("parses JSON values (arrays) from FEDRELAY_ variables", () => {
    const config = loadConfig({ env: { FEDRELAY_NATS__SERVERS: '["nats://a:1","nats://b:2"]' } });
    expect(config.nats.servers).toEqual(["nats://a:1", "nats://b:2"]);
  });

  it("ignores unrelated variables, unset ones, FEDRELAY_CONFIG and FEDRELAY_NATS_SERVER", () => {
    const config = loadConfig({
      env: {
        PATH: "/usr/bin",
        HOME: "/root",
        FEDRELAY_CONFIG: "/etc/fedrelay/config.json",
        FEDRELAY_NATS_SERVER: "/opt/nats-server",
        FEDRELAY_HTTP__HOST: undefined,
      },
    });
    expect(config).toEqual(loadConfig());
  });

  it("configFromEnv builds the nested input without validating it", () => {
    expect(
      configFromEnv({ FEDRELAY_HTTP__PORT: "9000", FEDRELAY_HTTP__HOST: "0.0.0.0", NATS_URL: "nats://x:1", DATABASE_URL: "pg://db" }),
    ).toEqual({
      http: { port: 9000, host: "0.0.0.0" },
      nats: { servers: ["nats://x:1"] },
      postgres: { url: "pg://db" },
    });
  });
});

describe("loadConfig precedence: file < env < overrides", () => {
  it("the environment beats the file, and overrides beat both", () => {
    const sources = { file: file({ http: { port: 1000 } }), env: { FEDRELAY_HTTP__PORT: "2000" } };
    expect(loadConfig({ file: sources.file }).http.port).toBe(1000);
    expect(loadConfig(sources).http.port).toBe(2000);
    expect(loadConfig({ ...sources, overrides: { http: { port: 3000 } } }).http.port).toBe(3000);
  });

  it("merges sections key by key rather than replacing them", () => {
    const config = loadConfig({
      file: file({ http: { host: "0.0.0.0", maxWaitSeconds: 10 }, postgres: { poolSize: 3 } }),
      env: { FEDRELAY_HTTP__PORT: "2000", DATABASE_URL: "postgresql://db/relay" },
      overrides: { http: { maxWaitSeconds: 5 } },
    });
    expect(config.http).toMatchObject({ host: "0.0.0.0", port: 2000, maxWaitSeconds: 5 });
    expect(config.postgres).toMatchObject({ url: "postgresql://db/relay", poolSize: 3 });
  });

  it("overrides replace arrays instead of concatenating them", () => {
    const config = loadConfig({ env: { NATS_URL: "nats://a:1,nats://b:2" }, overrides: { nats: { servers: ["nats://c:3"] } } });
    expect(config.nats.servers).toEqual(["nats://c:3"]);
  });

  it("the homeserver from the file, env and overrides follows the same order", () => {
    const f = file({ homeserver: "from-file.example" });
    expect(loadConfig({ file: f }).homeserver).toBe("from-file.example");
    expect(loadConfig({ file: f, env: { FEDRELAY_HOMESERVER: "from-env.example" } }).homeserver).toBe("from-env.example");
    expect(
      loadConfig({ file: f, env: { FEDRELAY_HOMESERVER: "from-env.example" }, overrides: { homeserver: "flag.example" } })
        .homeserver,
    ).toBe("flag.example");
  });
});

describe("loadConfig validation", () => {
  it("refuses an out-of-range port with config_invalid naming http.port", () => {
    const err = configError({ overrides: { http: { port: 70000 } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("http.port");
    expect(err.httpStatus).toBe(500);
  });

  it("refuses a non-numeric port from the environment naming http.port", () => {
    const err = configError({ env: { FEDRELAY_HTTP__PORT: "eighty" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("http.port");
  });

  it("refuses an invalid value from the file naming its key", () => {
    const err = configError({ file: file({ postgres: { poolSize: 0 } }) });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("postgres.poolSize");
  });

  it("refuses an uppercase homeserver name naming homeserver", () => {
    const err = configError({ env: { FEDRELAY_HOMESERVER: "Beta.Example.org" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("homeserver");
  });

  it("refuses a body limit above the protocol's 64 KiB naming limits.maxBodyBytes", () => {
    const err = configError({ overrides: { limits: { maxBodyBytes: 64 * 1024 + 1 } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("limits.maxBodyBytes");
  });

  it("refuses a fan-out lifetime above 7 days naming fanout.eventLifetimeSeconds", () => {
    const err = configError({ overrides: { fanout: { eventLifetimeSeconds: 7 * 24 * 3600 + 1 } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("fanout.eventLifetimeSeconds");
  });

  it("refuses an invalid peer name naming peers", () => {
    const err = configError({ overrides: { peers: { Alpha_Example: { jwksUrl: "https://alpha.example/jwks.json" } } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("peers");
  });

  it("refuses a peer with neither keys nor jwksUrl naming it", () => {
    const err = configError({ overrides: { peers: { "alpha.example": {} } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("peers.alpha.example");
  });

  it("refuses a short service token naming http.serviceToken", () => {
    const err = configError({ env: { FEDRELAY_HTTP__SERVICE_TOKEN: "short" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("http.serviceToken");
  });

  it("refuses a headers timeout longer than the request timeout, naming http.headersTimeoutMs", () => {
    const err = configError({ overrides: { http: { headersTimeoutMs: 5000, requestTimeoutMs: 1000 } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toMatch(/http\.headersTimeoutMs/);
    expect(loadConfig({ overrides: { http: { headersTimeoutMs: 1000, requestTimeoutMs: 1000 } } }).http.headersTimeoutMs).toBe(1000);
  });

  it("takes an operator listener from the environment, and leaves it unset by default", () => {
    expect(loadConfig().http.operator).toBeUndefined();
    const config = loadConfig({ env: { FEDRELAY_HTTP__OPERATOR__PORT: "9464", FEDRELAY_HTTP__OPERATOR__HOST: "10.0.0.5" } });
    expect(config.http.operator).toEqual({ host: "10.0.0.5", port: 9464 });
    expect(loadConfig({ env: { FEDRELAY_HTTP__OPERATOR__PORT: "9464" } }).http.operator).toEqual({ host: "127.0.0.1", port: 9464 });
  });

  it("refuses an unknown top-level key (a typo) naming it", () => {
    const err = configError({ overrides: { homeservr: "beta.example.org" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("homeservr");
  });

  it("refuses an unknown top-level key from the environment naming it", () => {
    const err = configError({ env: { FEDRELAY_HOMESERVR: "beta.example.org" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("homeservr");
  });

  it("refuses an unknown key inside a section (http.prot) naming it", () => {
    const err = configError({ overrides: { http: { prot: 9000 } } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("prot");
  });

  it("refuses a typo'd section key from the environment (FEDRELAY_HTTP__PROT) naming it", () => {
    const err = configError({ env: { FEDRELAY_HTTP__PROT: "9000" } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("prot");
  });

  it("refuses a config file that is not JSON, naming the file", () => {
    const err = configError({ file: { path: "/etc/fedrelay/broken.json", text: '{ "http": { "port": 80, } }' } });
    expect(err.code).toBe("config_invalid");
    expect(err.message).toContain("/etc/fedrelay/broken.json");
  });

  it.each([["an array", "[]"], ["null", "null"], ["a number", "42"], ["a string", '"config"'], ["empty text", ""]])(
    "refuses a config file holding %s",
    (_name, text) => {
      const err = configError({ file: { path: "c.json", text } });
      expect(err.code).toBe("config_invalid");
      expect(err.message).toContain("c.json");
    },
  );
});

describe("loadConfig result", () => {
  it("is deeply frozen", () => {
    const config = loadConfig({ env: { NATS_URL: "nats://a:1,nats://b:2" } });
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.http)).toBe(true);
    expect(Object.isFrozen(config.postgres)).toBe(true);
    expect(Object.isFrozen(config.nats.servers)).toBe(true);
    expect(Object.isFrozen(config.limits)).toBe(true);
    expect(Object.isFrozen(config.keys.retired)).toBe(true);
    expect(Object.isFrozen(config.peers)).toBe(true);
  });

  it("throws on an attempt to change it", () => {
    const config = loadConfig();
    expect(() => {
      (config.http as { port: number }).port = 1;
    }).toThrow(TypeError);
    expect(() => {
      (config as { homeserver: string }).homeserver = "evil.example";
    }).toThrow(TypeError);
    expect(() => {
      (config.nats.servers as string[]).push("nats://evil:4222");
    }).toThrow(TypeError);
    expect(config.http.port).toBe(8080);
  });

  it("does not leak state between loads (a frozen default does not stop a later override)", () => {
    loadConfig();
    const config = loadConfig({ overrides: { http: { port: 1234 }, nats: { servers: ["nats://x:1"] } } });
    expect(config.http.port).toBe(1234);
    expect(config.nats.servers).toEqual(["nats://x:1"]);
    expect(loadConfig().http.port).toBe(8080);
    expect(loadConfig().nats.servers).toEqual(["nats://127.0.0.1:4222"]);
  });

  it("does not modify the caller's overrides object", () => {
    const overrides = { http: { port: 4321 }, nats: { servers: ["nats://x:1"] } };
    loadConfig({ overrides });
    expect(Object.isFrozen(overrides)).toBe(false);
    expect(Object.isFrozen(overrides.http)).toBe(false);
    expect(Object.isFrozen(overrides.nats.servers)).toBe(false);
    expect(overrides).toEqual({ http: { port: 4321 }, nats: { servers: ["nats://x:1"] } });
  });
});
