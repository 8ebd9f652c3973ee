import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createKeyRegistry, type JwksSettings, type KeyRegistry, type PeerSource } from "../../src/keys/registry.ts";
import { importVerificationKey, jwkThumbprint, type VerificationKey } from "../../src/protocol/keys.ts";
import { createDb, type Db } from "../../src/store/db.ts";
import { migrate, readMigrations } from "../../src/store/migrate.ts";
import { bindKeys, keyStoreOf, revokePeerKey } from "../../src/store/peer-keys.ts";
import { DEFAULT_EVENT_LIMITS } from "../../src/protocol/claims.ts";
import { verifyEvent } from "../../src/protocol/verify.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { inboxSubject } from "../../src/protocol/subjects.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import { addClient, eventually, grantCapability, http, identity, natsClient, signed, startHomeserver, type Identity } from "../helpers/federation.ts";
import { testSchema, type TestSchema } from "../helpers/db.ts";
import { refusedKinds, startJwksEndpoint, type JwksEndpoint } from "../helpers/keys.ts";

let jwks: JwksEndpoint;
beforeAll(async () => { jwks = await startJwksEndpoint(); });
afterAll(async () => { await jwks?.close(); });

/** A registry of beta's that knows alpha by `jwksUrl`, on a clock the test moves, counting what it refuses. */
function registryOf(settings: Partial<JwksSettings> = {}) {
  // Real time at first, so events signed now are valid at it; the tests move it on.
  const clock = { now: Math.floor(Date.now() / 1000) };
  const refused: { peer: string; reason: string; kid: string | undefined }[] = [];
  let failedFetches = 0;
  const registry = createKeyRegistry({
    self: { homeserver: "beta", keys: [] }, peers: { alpha: { jwksUrl: jwks.url }, gamma: { keys: [] } }, now: () => clock.now,
    jwks: { refreshCooldownSeconds: 60, ...settings },
    onKeyRefused: (peer, r) => refused.push({ peer, reason: r.reason, kid: r.kid }),
    onFetchFailed: () => (failedFetches += 1),
  });
  return { registry, clock, refused, failed: () => failedFetches };
}

const settled = (registry: KeyRegistry, kid: string, at: number) =>
  eventually(async () => { const l = registry.lookup(kid, at); return l.status !== "wait" && l; }, 5000, `${kid} settled`);

describe("the key registry looks peers' keys up without waiting for a fetch", () => {
  let alpha: Identity, alpha2: Identity, gamma: Identity;
  beforeAll(async () => {
    [alpha, alpha2, gamma] = await Promise.all([identity("alpha", "k1"), identity("alpha", "k2"), identity("gamma")]);
  });
  beforeEach(() => {
    jwks.mode = "serve";
    jwks.fetches = 0;
  });

  it("fetches a peer's key set in the background on an unknown kid, refetches on the next, and respects the cooldown", async () => {
    jwks.keys = [alpha.publicJwk];
    const { registry, clock } = registryOf();
    // The first look answers at once (wait), and starts the fetch.
    expect(registry.lookup("alpha#k1", clock.now)).toEqual({ status: "wait", retryMs: 500, detail: "waiting for alpha's key set" });
    expect(await settled(registry, "alpha#k1", clock.now)).toMatchObject({ status: "found", key: { kid: "alpha#k1" } });
    expect(jwks.fetches).toBe(1);

    // alpha rotates: the new kid is unknown, so one refetch finds it.
    jwks.keys = [alpha.publicJwk, alpha2.publicJwk];
    clock.now += 61;
    expect(await settled(registry, "alpha#k2", clock.now)).toMatchObject({ status: "found", key: { kid: "alpha#k2" } });
    expect(jwks.fetches).toBe(2);

    // A flood of forged kids within the cooldown costs no further requests: each waits for the next
    // fetch allowed (the cooldown's end), and one that arrived before the last fetch began is refused.
    for (let i = 0; i < 20; i++) {
      expect(registry.lookup(`alpha#forged${i}`, clock.now + 1)).toEqual({ status: "wait", retryMs: 60_000, detail: "waiting for alpha's key set" });
    }
    expect(registry.lookup("alpha#forged", clock.now - 6)).toEqual({ status: "unknown", detail: "no key alpha#forged in alpha's key set" });
    expect(jwks.fetches).toBe(2);
    // Known keys never need a fetch, and stay after the peer drops them (retired keys still verify old events).
    jwks.keys = [];
    clock.now += 61;
    expect(registry.lookup("alpha#k1", clock.now)).toMatchObject({ status: "found" });
    expect(jwks.fetches).toBe(2);
  });

  it("takes from a peer's set only keys that name it, and knows no key of a peer with inline keys or of a stranger", async () => {
    jwks.keys = [alpha.publicJwk, gamma.publicJwk];
    const { registry, clock, refused } = registryOf();
    expect(await settled(registry, "alpha#k1", clock.now)).toMatchObject({ status: "found" });
    expect(refused).toEqual([{ peer: "alpha", reason: "other_homeserver", kid: "gamma#k1" }]);
    expect(registry.lookup("gamma#k1", clock.now)).toEqual({ status: "unknown", detail: "no key gamma#k1" });
    expect(registry.lookup("delta#k1", clock.now)).toEqual({ status: "unknown", detail: "no key delta#k1" });
    expect(registry.isKnown("gamma")).toBe(true);
    expect(registry.isKnown("delta")).toBe(false);
  });

  it("lets an event wait, never refused, while the endpoint is down or hangs, and finds its key once it answers", async () => {
    jwks.keys = [alpha.publicJwk];
    const { registry, clock, failed } = registryOf({ refreshCooldownSeconds: 1, timeoutMs: 300, maxWaitSeconds: 600 });
    const receivedAt = clock.now;
    jwks.mode = "down";
    expect(registry.lookup("alpha#k1", receivedAt).status).toBe("wait");
    await eventually(async () => failed() === 1, 5000, "the failed fetch");
    expect(registry.lookup("alpha#k1", receivedAt)).toMatchObject({ status: "wait", detail: "waiting for alpha's key set (last fetch: HTTP 503)" });

    jwks.mode = "hang";
    clock.now += 2;
    const started = performance.now();
    expect(registry.lookup("alpha#k1", receivedAt).status).toBe("wait");
    expect(performance.now() - started).toBeLessThan(50);
    await eventually(async () => failed() === 2, 5000, "the hanging fetch to time out");
    expect(registry.lookup("alpha#k1", receivedAt)).toHaveProperty("detail", expect.stringMatching(/last fetch: .*(timeout|aborted)/i));

    jwks.mode = "serve";
    clock.now += 2;
    expect(await settled(registry, "alpha#k1", receivedAt)).toMatchObject({ status: "found" });

    // An endpoint down from the start: an event waits for its key up to maxWaitSeconds, then is unknown_key.
    jwks.mode = "down";
    const down = registryOf({ refreshCooldownSeconds: 1, maxWaitSeconds: 600 });
    expect(down.registry.lookup("alpha#k1", down.clock.now - 599).status).toBe("wait");
    await eventually(async () => down.failed() === 1, 5000, "the failed fetch");
    expect(down.registry.lookup("alpha#k1", down.clock.now - 601)).toEqual({ status: "unknown", detail: "no key alpha#k1: alpha's key set could not be fetched for 600 s (HTTP 503)" });
  });

  it("takes every good key of a set that holds one of each kind the relay refuses, and each good key verifies its events", async () => {
    const good = await Promise.all(["good1", "good2", "good3"].map((k) => identity("alpha", k)));
    const kinds = refusedKinds();
    jwks.keys = [good[0]!.publicJwk, ...kinds.slice(0, 10).map((k) => k.jwk), good[1]!.publicJwk, ...kinds.slice(10).map((k) => k.jwk), good[2]!.publicJwk] as object[];
    const { registry, clock, refused } = registryOf();
    expect(await settled(registry, "alpha#good1", clock.now)).toMatchObject({ status: "found" });
    expect(refused.map((r) => r.reason)).toEqual(kinds.map((k) => k.reason));
    for (const who of good) {
      const event = await signed(who, "beta", [{ cid: "bob" }]);
      const verdict = await verifyEvent(Buffer.from(event.token), inboxSubject("beta", "alpha"), {
        self: "beta", limits: DEFAULT_EVENT_LIMITS, keys: registry, isSenderAllowed: () => true, now: clock.now,
      });
      expect(verdict.ok, `${who.key.kid}: ${JSON.stringify(verdict)}`).toBe(true);
    }
    // An event under a refused key is refused with the key's own reason.
    // (Arrived before the fetch began, by more than the clock-skew margin of 5 s.)
    expect(registry.lookup("alpha#bad", clock.now - 6)).toMatchObject({ status: "unknown", detail: expect.stringContaining("was refused (") });
  });

  it("never rebinds a known kid: a set serving another key under it is refused rebound_kid, and the first key still verifies", async () => {
    const impostor = await identity("alpha", "k1");
    jwks.keys = [alpha.publicJwk];
    const { registry, clock, refused } = registryOf();
    const first = await settled(registry, "alpha#k1", clock.now);
    jwks.keys = [impostor.publicJwk, alpha2.publicJwk];
    clock.now += 61;
    expect(await settled(registry, "alpha#k2", clock.now)).toMatchObject({ status: "found" });
    expect(refused).toEqual([{ peer: "alpha", reason: "rebound_kid", kid: "alpha#k1" }]);
    expect(registry.lookup("alpha#k1", clock.now)).toEqual(first);
    const forged = await signed(impostor, "beta", [{ cid: "bob" }]);
    const verdict = await verifyEvent(Buffer.from(forged.token), inboxSubject("beta", "alpha"), {
      self: "beta", limits: DEFAULT_EVENT_LIMITS, keys: registry, isSenderAllowed: () => true, now: clock.now,
    });
    expect(verdict).toMatchObject({ ok: false, reason: "bad_signature" });
  });

  it("learns a retirement at the next fetch; a retired key then verifies only events received before its exp, or when it was learned, plus the grace", async () => {
    const [k1, k2] = await Promise.all([identity("alpha", "r1"), identity("alpha", "r2")]);
    jwks.keys = [k1.publicJwk];
    const { registry, clock, refused } = registryOf({ retiredGraceSeconds: 60 });
    await settled(registry, "alpha#r1", clock.now);

    // Rotation: r1 retired (exp in the past by the time we learn it), r2 scheduled to retire in 1,000 s.
    const rotatedAt = clock.now + 10;
    jwks.keys = [{ ...k1.publicJwk, exp: rotatedAt }, { ...k2.publicJwk, exp: rotatedAt + 1000 }];
    clock.now += 61;
    const learnedAt = clock.now;
    expect(await settled(registry, "alpha#r2", learnedAt)).toMatchObject({ status: "found" });
    expect(registry.lookup("alpha#r1", learnedAt + 59)).toMatchObject({ status: "found", key: { validUntil: rotatedAt } });
    expect(registry.lookup("alpha#r1", learnedAt + 61)).toEqual({ status: "unknown", detail: expect.stringMatching(/^key alpha#r1 is retired: it verifies only events received before /) });
    expect(registry.lookup("alpha#r2", rotatedAt + 1000 + 59)).toMatchObject({ status: "found" });
    expect(registry.lookup("alpha#r2", rotatedAt + 1000 + 61)).toMatchObject({ status: "unknown" });

    // Un-retiring r1 (its exp gone) is refused, and it stays retired.
    jwks.keys = [k1.publicJwk, { ...k2.publicJwk, exp: rotatedAt + 1000 }];
    clock.now += 61;
    expect(await settled(registry, "alpha#r3", clock.now - 6)).toMatchObject({ status: "unknown" });
    expect(refused).toContainEqual({ peer: "alpha", reason: "validity_widened", kid: "alpha#r1" });
    expect(registry.lookup("alpha#r1", learnedAt + 61)).toMatchObject({ status: "unknown" });
  });

  it("fetches every peer's set each refreshIntervalSeconds as well, until closed", async () => {
    jwks.keys = [alpha.publicJwk];
    const { registry, clock } = registryOf({ refreshIntervalSeconds: 1, refreshCooldownSeconds: 1 });
    await settled(registry, "alpha#k1", clock.now);
    const before = jwks.fetches;
    clock.now += 2;
    await eventually(async () => jwks.fetches > before, 5000, "a periodic fetch");
    registry.close();
    const after = jwks.fetches;
    clock.now += 2;
    await new Promise((r) => setTimeout(r, 1500));
    expect(jwks.fetches).toBe(after);
  });

  it("refuses a set of 100,000 keys (10 MB) whole, reading no more than its byte limit, and keeps the keys it knew", async () => {
    jwks.keys = [alpha.publicJwk];
    const { registry, clock, failed } = registryOf();
    await settled(registry, "alpha#k1", clock.now);
    const huge = JSON.stringify({ keys: Array.from({ length: 100_000 }, (_, i) => ({ ...alpha2.publicJwk, kid: `alpha#k${i}` })) });
    expect(huge.length).toBeGreaterThan(10_000_000);
    jwks.mode = { body: huge };
    clock.now += 61;
    const heapBefore = process.memoryUsage().heapUsed;
    expect(registry.lookup("alpha#k2", clock.now).status).toBe("wait");
    await eventually(async () => failed() === 1, 5000, "the refused set");
    expect(registry.lookup("alpha#k2", clock.now)).toHaveProperty("detail", expect.stringContaining("over 262144 bytes"));
    // Not the 155 MB the whole set cost once: at most the limit read, and what is garbage by now.
    expect(process.memoryUsage().heapUsed - heapBefore).toBeLessThan(40 * 1024 * 1024);
    expect(registry.lookup("alpha#k1", clock.now)).toMatchObject({ status: "found" });
  });
});

describe("a homeserver that knows its peer only by JWKS URL", () => {
  let nats: LocalNats;
  beforeAll(async () => { nats = await startLocalNats(); });
  afterAll(async () => { await nats?.stop(); });

  it("verifies the peer's events with keys fetched from the peer's own relay", async () => {
    const [alpha, beta] = await Promise.all([identity("alpha"), identity("beta")]);
    const alphaHs = await startHomeserver(alpha, { natsUrl: nats.url, peers: [], roles: { api: true, worker: false } });
    const betaHs = await startHomeserver(beta, {
      natsUrl: nats.url, peers: [],
      overrides: { peers: { alpha: { jwksUrl: `${alphaHs.relay.url}/.well-known/fedrelay/jwks.json` } } },
    });
    const client = await natsClient(nats.url);
    try {
      const token = await addClient(betaHs, "bob");
      const event = await signed(alpha, "beta", [{ cid: "bob", cap: await grantCapability(betaHs, "bob", "g@alpha") }]);
      await publishEvent(client.js, inboxSubject("beta", "alpha"), Buffer.from(event.token), 5000);
      const got = await eventually(async () => {
        const res = await http(`${betaHs.relay.url}/v1/messages`, { token });
        const list = res.json.messages as { event: string }[];
        return list.length > 0 && list;
      });
      expect(got.map((m) => m.event)).toEqual([event.claims.jti]);
    } finally {
      await client.close();
      await betaHs.close();
      await alphaHs.close();
    }
  });
});

describe("the key history binds a kid to one key across processes and restarts", () => {
  let schema: TestSchema;
  let db: Db;
  beforeAll(async () => {
    schema = testSchema("key_history");
    db = createDb({ url: schema.url, schema: schema.schema, poolSize: 2 });
    await migrate(db.pool, schema.schema);
  });
  afterAll(async () => {
    await db?.close();
    await schema?.drop();
  });
  beforeEach(() => {
    jwks.mode = "serve";
  });

  const store = () => keyStoreOf(db);
  const withStore = (refused: string[] = [], peers: Record<string, PeerSource> = { alpha: { jwksUrl: jwks.url } }) => createKeyRegistry({
    self: { homeserver: "beta", keys: [] }, peers, store: store(), jwks: { refreshCooldownSeconds: 1 },
    onKeyRefused: (_peer, r) => refused.push(`${r.kid}:${r.reason}`),
  });

  it("a second registry on the same database (another worker, or this one restarted) knows the bound key without a fetch, and refuses another key under its kid", async () => {
    const [k1, impostor, k2] = await Promise.all([identity("alpha", "h1"), identity("alpha", "h1"), identity("alpha", "h2")]);
    jwks.keys = [k1.publicJwk];
    const first = withStore();
    await first.ready;
    const now = Date.now() / 1000;
    const original = await settled(first, "alpha#h1", now);

    jwks.keys = [impostor.publicJwk, k2.publicJwk];
    jwks.fetches = 0;
    const refused: string[] = [];
    const second = withStore(refused);
    await second.ready;
    expect(second.lookup("alpha#h1", now)).toEqual(original);
    expect(jwks.fetches).toBe(0);
    // Its next fetch: the impostor under h1 is refused, h2 is bound.
    expect(await settled(second, "alpha#h2", Date.now() / 1000 + 1)).toMatchObject({ status: "found" });
    expect(refused).toEqual(["alpha#h1:rebound_kid"]);
    expect(second.lookup("alpha#h1", now)).toEqual(original);

    const rows = await db.kysely.selectFrom("peer_keys").select(["kid", "thumbprint", "last_seen", "rebound"]).where("homeserver", "=", "alpha").orderBy("kid").execute();
    expect(rows.map((r) => [r.kid, r.thumbprint, r.rebound, r.last_seen instanceof Date])).toEqual([
      ["alpha#h1", (original as { key: VerificationKey }).key.thumbprint, false, true],
      ["alpha#h2", jwkThumbprint(k2.publicJwk as { x: string }), false, true],
    ]);
  });

  it("another process binding a kid first wins: a registry that fetched a different key under it uses the bound one", async () => {
    const [mine, theirs] = await Promise.all([identity("alpha", "race"), identity("alpha", "race")]);
    await bindKeys(db, [await importVerificationKey(theirs.publicJwk)], []);
    jwks.keys = [mine.publicJwk];
    const refused: string[] = [];
    const registry = withStore(refused, { alpha: { jwksUrl: jwks.url } });
    await registry.ready;
    expect(registry.lookup("alpha#race", Date.now() / 1000)).toMatchObject({ status: "found", key: { thumbprint: jwkThumbprint(theirs.publicJwk as { x: string }) } });
    expect(refused).toEqual([]);
  });

  it("refuses to start with an inline key whose kid the history binds to another key", async () => {
    const [bound, other] = await Promise.all([identity("gamma", "cfg"), identity("gamma", "cfg")]);
    await bindKeys(db, [await importVerificationKey(bound.publicJwk)], []);
    const registry = withStore([], { gamma: { keys: [other.publicJwk] } });
    await expect(registry.ready).rejects.toThrow(/gamma#cfg of gamma refused \(rebound_kid\)/);
  });

  it("a revoked peer key is refused by every registry within a second, whatever its events' dates; revoking twice keeps the first time", async () => {
    const key = await identity("alpha", "stolen");
    jwks.keys = [key.publicJwk];
    const registry = createKeyRegistry({
      self: { homeserver: "beta", keys: [] }, peers: { alpha: { jwksUrl: jwks.url } }, store: store(), jwks: { revocationRefreshMs: 100 },
    });
    await registry.ready;
    const before = Date.now() / 1000;
    expect(await settled(registry, "alpha#stolen", before)).toMatchObject({ status: "found" });
    const revoked = await revokePeerKey(db, "alpha#stolen");
    expect(revoked).toMatchObject({ kid: "alpha#stolen", storedEvents: 0 });
    await eventually(async () => registry.lookup("alpha#stolen", before).status === "unknown", 1000, "the revocation, within a second");
    expect(registry.lookup("alpha#stolen", before - 3600)).toEqual({ status: "unknown", detail: `key alpha#stolen was revoked by this homeserver's operator at ${revoked.revokedAt.toISOString()}` });
    expect((await revokePeerKey(db, "alpha#stolen")).revokedAt).toEqual(revoked.revokedAt);
    await expect(revokePeerKey(db, "alpha#nosuch")).rejects.toThrow("no peer key alpha#nosuch in the key history");
    registry.close();
  });

  it("a key served under a second kid is refused as reused_key: a key is named by one kid", async () => {
    const key = await identity("alpha", "u1");
    jwks.keys = [key.publicJwk, { ...key.publicJwk, kid: "alpha#u2" }];
    const refused: string[] = [];
    const registry = withStore(refused);
    await registry.ready;
    expect(await settled(registry, "alpha#u1", Date.now() / 1000)).toMatchObject({ status: "found" });
    expect(refused).toContain("alpha#u2:reused_key");
    expect(registry.lookup("alpha#u2", Date.now() / 1000 - 10)).toMatchObject({ status: "unknown", detail: expect.stringContaining("reused_key") });
    registry.close();
  });

  it("a retirement one process learned reaches another within a second, and a set without the exp does not undo it there", async () => {
    const key = await identity("alpha", "shared");
    jwks.keys = [key.publicJwk];
    const settings = { refreshCooldownSeconds: 1, revocationRefreshMs: 100 };
    const make = () => createKeyRegistry({ self: { homeserver: "beta", keys: [] }, peers: { alpha: { jwksUrl: jwks.url } }, store: store(), jwks: settings });
    const [a, b] = [make(), make()];
    await Promise.all([a.ready, b.ready]);
    const at = Date.now() / 1000;
    await settled(a, "alpha#shared", at);
    await settled(b, "alpha#shared", at);
    // a learns the retirement; b is then served the set without it (a stale copy) and must not keep the key open.
    const validUntil = (r: KeyRegistry): number | undefined => (r.lookup("alpha#shared", at) as { key?: VerificationKey }).key?.validUntil;
    const fetchNow = async (r: KeyRegistry): Promise<void> => {
      const before = jwks.fetches;
      r.lookup(`alpha#probe${before}`, Date.now() / 1000);
      await eventually(async () => jwks.fetches > before, 3000, "a fetch");
    };
    const exp = (key.publicJwk as { nbf: number }).nbf + 1800;
    jwks.keys = [{ ...key.publicJwk, exp }];
    await new Promise((r) => setTimeout(r, 1100)); // past the cooldown
    await fetchNow(a);
    await eventually(async () => validUntil(a) === exp, 2000, "a learns the retirement");
    await eventually(async () => validUntil(b) === exp, 2000, "b holds it, from the history");
    jwks.keys = [key.publicJwk];
    await new Promise((r) => setTimeout(r, 1100));
    await fetchNow(b);
    await new Promise((r) => setTimeout(r, 300));
    expect(validUntil(b)).toBe(exp);
    a.close();
    b.close();
  });

  it("migration 013 keeps rows of a kid bound twice before it, the first as the binding and the later as rebound", async () => {
    const legacy = testSchema("key_history_legacy");
    const legacyDb = createDb({ url: legacy.url, schema: legacy.schema, poolSize: 1 });
    try {
      const all = await readMigrations();
      await migrate(legacyDb.pool, legacy.schema, all.filter((m) => m.name < "013"));
      const [a, b] = await Promise.all([identity("alpha", "old"), identity("alpha", "old")]);
      for (const [who, at] of [[a, "2026-01-01"], [b, "2026-02-01"]] as const) {
        const key = await importVerificationKey(who.publicJwk);
        await legacyDb.kysely.insertInto("peer_keys").values({ thumbprint: key.thumbprint, kid: key.kid, homeserver: "alpha", jwk: JSON.stringify(key.jwk), first_seen: at }).execute();
      }
      await migrate(legacyDb.pool, legacy.schema, all);
      const rows = await legacyDb.kysely.selectFrom("peer_keys").select(["first_seen", "rebound"]).orderBy("first_seen").execute();
      expect(rows.map((r) => r.rebound)).toEqual([false, true]);
    } finally {
      await legacyDb.close();
      await legacy.drop();
    }
  });
});
