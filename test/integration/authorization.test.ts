/**
 * Authorization end to end (DESIGN §5 step 7, §6, §8, §9): per-recipient
 * capability and block checks, server allow/deny policy, delivery reports and
 * the capabilities API, against a real nats-server and Postgres.
 */
import { createPublicKey, randomBytes } from "node:crypto";
import { compactVerify, decodeJwt, decodeProtectedHeader } from "jose";
import { sql } from "kysely";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { REPORT_TYP, type EventClaims } from "../../src/protocol/claims.ts";
import { signEvent } from "../../src/protocol/sign.ts";
import { inboxSubject, reportSubject } from "../../src/protocol/subjects.ts";
import { issueCapability } from "../../src/store/capabilities.ts";
import { registerClient } from "../../src/store/clients.ts";
import { publishEvent } from "../../src/transport/publisher.ts";
import {
  addClient, eventually, grantCapability, http, identity, natsClient, SERVICE_TOKEN, signed, startHomeserver,
  type Identity, type NatsClient, type TestHomeserver,
} from "../helpers/federation.ts";

let nats: LocalNats;
let client: NatsClient;
let alpha: Identity, beta: Identity, gamma: Identity;
let alphaHs: TestHomeserver, betaHs: TestHomeserver;

beforeAll(async () => {
  nats = await startLocalNats();
  client = await natsClient(nats.url);
  [alpha, beta, gamma] = await Promise.all([identity("alpha"), identity("beta"), identity("gamma")]);
  // gamma runs no relay here: the tests sign its events with its key and publish them themselves.
  [alphaHs, betaHs] = await Promise.all([
    startHomeserver(alpha, { natsUrl: nats.url, peers: [beta, gamma] }),
    startHomeserver(beta, { natsUrl: nats.url, peers: [alpha, gamma] }),
  ]);
});

afterAll(async () => {
  await alphaHs?.close();
  await betaHs?.close();
  await client?.close();
  await nats?.stop();
});

// Every test uses its own clients on the shared homeservers.
let counter = 0;
const uniq = (prefix: string): string => `${prefix}-${++counter}`;
const b64 = (text: string): string => Buffer.from(text).toString("base64url");
const randomSecret = (): string => randomBytes(32).toString("base64url");

const CLIMBING = "climbing@alpha";
const BOULDERING = "bouldering@alpha";

type Rcpt = EventClaims["rcpt"];
type Res = { status: number; json: Record<string, unknown> };

interface Member {
  readonly id: string;
  readonly token: string;
  /** Capability secrets by group, issued by beta's backend. */
  readonly caps: Record<string, string>;
}

/** A client of `hs` with a capability for each of `groups`. */
async function member(prefix: string, groups: readonly string[] = [CLIMBING], hs: TestHomeserver = betaHs): Promise<Member> {
  const id = uniq(prefix);
  const token = await addClient(hs, id);
  const caps: Record<string, string> = {};
  for (const g of groups) caps[g] = await grantCapability(hs, id, g);
  return { id, token, caps };
}

function expectError(res: Res, status: number, code: string): void {
  expect({ status: res.status, json: res.json }).toEqual({ status, json: { error: code, message: expect.any(String) } });
}

async function publish(dest: TestHomeserver, from: Identity, token: string): Promise<number> {
  return (await publishEvent(client.js, inboxSubject(dest.id.name, from.name), Buffer.from(token, "latin1"), 5000)).seq;
}

/** `from` signs an event for `grp` to `dest` and publishes it to dest's inbox. */
async function send(from: Identity, rcpt: Rcpt, grp: string, dest: TestHomeserver = betaHs): Promise<{ claims: EventClaims; token: string; seq: number }> {
  const event = await signed(from, dest.id.name, rcpt, { grp });
  return { ...event, seq: await publish(dest, from, event.token) };
}

interface Decision {
  /** Client ids with a delivery, sorted. */
  readonly accepted: string[];
  /** Refused client id → reason. */
  readonly refused: Record<string, string>;
}

/** Waits for the event's commit, then reads what it decided per recipient (same transaction, so final). */
async function decided(iss: string, jti: string, hs: TestHomeserver = betaHs): Promise<Decision> {
  const db = hs.relay.db.kysely;
  await eventually(async () =>
    (await db.selectFrom("events").select("jti").where("iss", "=", iss).where("jti", "=", jti).executeTakeFirst()) !== undefined,
  15_000, `event ${iss}/${jti} stored`);
  const deliveries = await db.selectFrom("deliveries").select("client_id").where("iss", "=", iss).where("jti", "=", jti)
    .orderBy("client_id").execute();
  const refusals = await db.selectFrom("all_recipient_refusals").select(["client_id", "reason"]).where("iss", "=", iss).where("jti", "=", jti)
    .execute();
  return { accepted: deliveries.map((d) => d.client_id), refused: Object.fromEntries(refusals.map((r) => [r.client_id, r.reason])) };
}

async function eventStored(iss: string, jti: string, hs: TestHomeserver): Promise<boolean> {
  return (await hs.relay.db.kysely.selectFrom("events").select("jti").where("iss", "=", iss).where("jti", "=", jti).executeTakeFirst()) !== undefined;
}

/** The event ids a client can pick up. */
async function inbox(m: Member, hs: TestHomeserver = betaHs): Promise<string[]> {
  const res = await http(`${hs.relay.url}/v1/messages?limit=1000`, { token: m.token });
  expect(res.status).toBe(200);
  return (res.json.messages as { event: string }[]).map((x) => x.event);
}

function fanout(body: unknown, query = ""): Promise<Res> {
  return http(`${alphaHs.relay.url}/v1/fanout${query}`, { method: "POST", token: SERVICE_TOKEN, body });
}

/** Recipients of a fan-out to beta; `cap: undefined` sends none. */
const at = (list: readonly { client: string; cap?: string | undefined }[]) =>
  list.map(({ client: c, cap }) => ({ server: "beta", client: c, ...(cap === undefined ? {} : { capability: cap }) }));

async function counterValue(c: { get(): Promise<{ values: { value: number; labels: Record<string, unknown> }[] }> }, reason?: string): Promise<number> {
  const { values } = await c.get();
  return values.filter((v) => reason === undefined || v.labels.reason === reason).reduce((sum, v) => sum + v.value, 0);
}

describe("per-recipient authorization (DESIGN §5 step 7)", () => {
  it("a recipient without a capability is refused no_capability and gets nothing, even when it holds one for the group", async () => {
    const bob = await member("bob");
    const { claims } = await send(alpha, [{ cid: bob.id }], CLIMBING);
    expect(await decided("alpha", claims.jti)).toEqual({ accepted: [], refused: { [bob.id]: "no_capability" } });
    expect(await inbox(bob)).toEqual([]);
    // The same client with its capability is accepted: only the missing cap made the difference.
    const ok = await send(alpha, [{ cid: bob.id, cap: bob.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", ok.claims.jti)).toEqual({ accepted: [bob.id], refused: {} });
    expect(await inbox(bob)).toEqual([ok.claims.jti]);
  });

  it("a capability bound to another client, group or owner, or an unknown secret, is refused capability_mismatch", async () => {
    const control = await member("control");
    const ann = await member("ann");
    const ben = await member("ben");
    const cal = await member("cal", [BOULDERING]);
    // Bound to (dot, climbing@alpha, gamma): only the owner differs from alpha's event for climbing@alpha.
    // (The API derives the owner from the group, so the store is used to make the binding differ in the owner alone.)
    const dot = await member("dot", []);
    const dotForeignOwner = (await issueCapability(betaHs.relay.db, dot.id, CLIMBING, "gamma")).capability;
    const eve = await member("eve", []);

    const { claims } = await send(alpha, [
      { cid: control.id, cap: control.caps[CLIMBING]! },
      { cid: ben.id, cap: ann.caps[CLIMBING]! }, // ann's: another client
      { cid: cal.id, cap: cal.caps[BOULDERING]! }, // bouldering@alpha: another group
      { cid: dot.id, cap: dotForeignOwner }, // owner gamma: another owner
      { cid: eve.id, cap: randomSecret() }, // never issued
    ], CLIMBING);
    expect(await decided("alpha", claims.jti)).toEqual({
      accepted: [control.id],
      refused: { [ben.id]: "capability_mismatch", [cal.id]: "capability_mismatch", [dot.id]: "capability_mismatch", [eve.id]: "capability_mismatch" },
    });
    for (const m of [ann, ben, cal, dot, eve]) expect(await inbox(m)).toEqual([]);
    expect(await inbox(control)).toEqual([claims.jti]);
  });

  it("a capability that leaked from alpha lets gamma deliver nothing, not even to a same-named group of its own", async () => {
    const fay = await member("fay", [CLIMBING, "climbing@gamma"]);
    const leaked = await send(gamma, [{ cid: fay.id, cap: fay.caps[CLIMBING]! }], "climbing@gamma");
    expect(await decided("gamma", leaked.claims.jti)).toEqual({ accepted: [], refused: { [fay.id]: "capability_mismatch" } });
    // And alpha cannot use the capability fay gave gamma.
    const reverse = await send(alpha, [{ cid: fay.id, cap: fay.caps["climbing@gamma"]! }], CLIMBING);
    expect(await decided("alpha", reverse.claims.jti)).toEqual({ accepted: [], refused: { [fay.id]: "capability_mismatch" } });
    // gamma with its own capability is fine.
    const own = await send(gamma, [{ cid: fay.id, cap: fay.caps["climbing@gamma"]! }], "climbing@gamma");
    expect(await decided("gamma", own.claims.jti)).toEqual({ accepted: [fay.id], refused: {} });
    expect(await inbox(fay)).toEqual([own.claims.jti]);
  });

  it("a capability the client revoked with DELETE /v1/capabilities/{id} is refused capability_revoked from the next event on", async () => {
    const gus = await member("gus", []);
    const issued = await http(`${betaHs.relay.url}/v1/capabilities`, { method: "POST", token: gus.token, body: { group: CLIMBING } });
    expect(issued.status).toBe(201);
    const cap = issued.json.capability as string;
    const before = await send(alpha, [{ cid: gus.id, cap }], CLIMBING);
    expect(await decided("alpha", before.claims.jti)).toEqual({ accepted: [gus.id], refused: {} });

    const del = await http(`${betaHs.relay.url}/v1/capabilities/${issued.json.id as string}`, { method: "DELETE", token: gus.token });
    expect(del.status).toBe(204);
    const after = await send(alpha, [{ cid: gus.id, cap }], CLIMBING);
    expect(await decided("alpha", after.claims.jti)).toEqual({ accepted: [], refused: { [gus.id]: "capability_revoked" } });
    expect(await inbox(gus)).toEqual([before.claims.jti]);
  });

  it("a client removed by the backend after its capability was issued is refused unknown_client; re-registering the id does not revive the capability", async () => {
    const hal = await member("hal");
    const cap = hal.caps[CLIMBING]!;
    expect((await http(`${betaHs.relay.url}/v1/clients/${hal.id}`, { method: "DELETE", token: SERVICE_TOKEN })).status).toBe(204);
    expectError(await http(`${betaHs.relay.url}/v1/clients/${hal.id}`, { method: "DELETE", token: SERVICE_TOKEN }), 404, "not_found");
    expectError(await http(`${betaHs.relay.url}/v1/messages`, { token: hal.token }), 401, "unauthorized");

    const gone = await send(alpha, [{ cid: hal.id, cap }], CLIMBING);
    expect(await decided("alpha", gone.claims.jti)).toEqual({ accepted: [], refused: { [hal.id]: "unknown_client" } });

    // A new client under the same id must not receive what the old one's capability authorized.
    const reborn: Member = { id: hal.id, token: await addClient(betaHs, hal.id), caps: {} };
    const again = await send(alpha, [{ cid: hal.id, cap }], CLIMBING);
    expect(await decided("alpha", again.claims.jti)).toEqual({ accepted: [], refused: { [hal.id]: "capability_revoked" } });
    expect(await inbox(reborn)).toEqual([]);
  });

  it("a client's block of a homeserver refuses that sender's events blocked_by_client, others pass, and DELETE lets the next event through", async () => {
    const ivy = await member("ivy", [CLIMBING, "climbing@gamma"]);
    const blocks = `${betaHs.relay.url}/v1/blocks/servers/alpha`;
    expect(await http(blocks, { method: "PUT", token: ivy.token })).toEqual({ status: 201, json: { server: "alpha", blocked: true } });
    expect(await http(blocks, { method: "PUT", token: ivy.token })).toEqual({ status: 200, json: { server: "alpha", blocked: true } });
    expect(await http(blocks, { token: ivy.token })).toEqual({ status: 200, json: { server: "alpha", blocked: true } });
    expect(await http(`${betaHs.relay.url}/v1/blocks`, { token: ivy.token })).toEqual({ status: 200, json: { servers: ["alpha"], groups: [] } });

    const blocked = await send(alpha, [{ cid: ivy.id, cap: ivy.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", blocked.claims.jti)).toEqual({ accepted: [], refused: { [ivy.id]: "blocked_by_client" } });
    const fromGamma = await send(gamma, [{ cid: ivy.id, cap: ivy.caps["climbing@gamma"]! }], "climbing@gamma");
    expect(await decided("gamma", fromGamma.claims.jti)).toEqual({ accepted: [ivy.id], refused: {} });

    expect((await http(blocks, { method: "DELETE", token: ivy.token })).status).toBe(204);
    expectError(await http(blocks, { method: "DELETE", token: ivy.token }), 404, "not_found");
    const unblocked = await send(alpha, [{ cid: ivy.id, cap: ivy.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", unblocked.claims.jti)).toEqual({ accepted: [ivy.id], refused: {} });
    expect(await inbox(ivy)).toEqual([fromGamma.claims.jti, unblocked.claims.jti]);
  });

  it("a client's block of a group (URL-encoded id) refuses that group blocked_by_client, the owner's other groups pass, and DELETE lifts it", async () => {
    const jay = await member("jay", [CLIMBING, BOULDERING]);
    const blocks = `${betaHs.relay.url}/v1/blocks/groups/${encodeURIComponent(CLIMBING)}`;
    expect(blocks).toContain("climbing%40alpha");
    expect(await http(blocks, { method: "PUT", token: jay.token })).toEqual({ status: 201, json: { group: CLIMBING, blocked: true } });
    expect(await http(`${betaHs.relay.url}/v1/blocks`, { token: jay.token })).toEqual({ status: 200, json: { servers: [], groups: [CLIMBING] } });

    const blocked = await send(alpha, [{ cid: jay.id, cap: jay.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", blocked.claims.jti)).toEqual({ accepted: [], refused: { [jay.id]: "blocked_by_client" } });
    const other = await send(alpha, [{ cid: jay.id, cap: jay.caps[BOULDERING]! }], BOULDERING);
    expect(await decided("alpha", other.claims.jti)).toEqual({ accepted: [jay.id], refused: {} });

    expect((await http(blocks, { method: "DELETE", token: jay.token })).status).toBe(204);
    const unblocked = await send(alpha, [{ cid: jay.id, cap: jay.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", unblocked.claims.jti)).toEqual({ accepted: [jay.id], refused: {} });
    expect(await inbox(jay)).toEqual([other.claims.jti, unblocked.claims.jti]);
  });

  it("a block target that is not a homeserver name or group id is 400, and one client's block does not affect another", async () => {
    const kim = await member("kim");
    const lou = await member("lou");
    expectError(await http(`${betaHs.relay.url}/v1/blocks/servers/Not_A_Name`, { method: "PUT", token: kim.token }), 400, "bad_request");
    expectError(await http(`${betaHs.relay.url}/v1/blocks/groups/no-owner`, { method: "PUT", token: kim.token }), 400, "bad_request");
    expect((await http(`${betaHs.relay.url}/v1/blocks/servers/alpha`, { method: "PUT", token: kim.token })).status).toBe(201);
    const { claims } = await send(alpha, [{ cid: kim.id, cap: kim.caps[CLIMBING]! }, { cid: lou.id, cap: lou.caps[CLIMBING]! }], CLIMBING);
    expect(await decided("alpha", claims.jti)).toEqual({ accepted: [lou.id], refused: { [kim.id]: "blocked_by_client" } });
  });
});

describe("partial acceptance", () => {
  it("one fan-out commits its accepted recipients and records each refused one with its own reason", async () => {
    const [ok1, ok2, nocap, wrong, revoked, gone, blocker] = await Promise.all(
      ["ok", "ok", "nocap", "wrong", "revoked", "gone", "blocker"].map((p) => member(`part-${p}`)));
    const stranger = uniq("part-stranger");
    const ghost = uniq("part-ghost");

    const capId = ((await http(`${betaHs.relay.url}/v1/clients/${revoked!.id}/capabilities`, { token: SERVICE_TOKEN })).json
      .capabilities as { id: string }[])[0]!.id;
    expect((await http(`${betaHs.relay.url}/v1/clients/${revoked!.id}/capabilities/${capId}`, { method: "DELETE", token: SERVICE_TOKEN })).status).toBe(204);
    expect((await http(`${betaHs.relay.url}/v1/clients/${gone!.id}`, { method: "DELETE", token: SERVICE_TOKEN })).status).toBe(204);
    expect((await http(`${betaHs.relay.url}/v1/blocks/groups/${encodeURIComponent(CLIMBING)}`, { method: "PUT", token: blocker!.token })).status).toBe(201);

    const res = await fanout({
      group: CLIMBING, body: b64("partial"),
      recipients: at([
        { client: ok1!.id, cap: ok1!.caps[CLIMBING] },
        { client: nocap!.id },
        { client: stranger }, // not a client here, and no capability: the sender learns nothing
        { client: wrong!.id, cap: ok2!.caps[CLIMBING] },
        { client: ghost, cap: randomSecret() },
        { client: revoked!.id, cap: revoked!.caps[CLIMBING] },
        { client: gone!.id, cap: gone!.caps[CLIMBING] },
        { client: blocker!.id, cap: blocker!.caps[CLIMBING] },
        { client: ok2!.id, cap: ok2!.caps[CLIMBING] },
      ]),
    });
    expect(res.status).toBe(200);
    const jti = res.json.id as string;
    expect(await decided("alpha", jti)).toEqual({
      accepted: [ok1!.id, ok2!.id].sort(),
      refused: {
        [nocap!.id]: "no_capability",
        [stranger]: "no_capability",
        [wrong!.id]: "capability_mismatch",
        [ghost]: "capability_mismatch",
        [revoked!.id]: "capability_revoked",
        [gone!.id]: "unknown_client",
        [blocker!.id]: "blocked_by_client",
      },
    });
    expect(await inbox(ok1!)).toEqual([jti]);
    expect(await inbox(ok2!)).toEqual([jti]);
    for (const m of [nocap!, wrong!, revoked!, blocker!]) expect(await inbox(m)).toEqual([]);
  });
});

describe("delivery reports (DESIGN §8)", () => {
  it("POST /v1/fanout?wait=10 returns beta's signed report, matching what beta stored", async () => {
    const [a, b, c] = await Promise.all([member("rep-a"), member("rep-b"), member("rep-c")]);
    const nobody = uniq("rep-nobody");
    const res = await fanout({
      group: CLIMBING, body: b64("report me"),
      recipients: at([
        { client: a!.id, cap: a!.caps[CLIMBING] },
        { client: nobody },
        { client: b!.id, cap: b!.caps[CLIMBING] },
        { client: c!.id, cap: a!.caps[CLIMBING] },
      ]),
    }, "?wait=10");
    expect(res.status).toBe(200);
    const event = res.json.id as string;
    const expected = { server: "beta", event, accepted: [a!.id, b!.id], refused: [{ cid: nobody, reason: "no_capability" }, { cid: c!.id, reason: "capability_mismatch" }] };
    expect(res.json.reports).toEqual([expected]);

    // What beta stored says the same.
    const stored = await decided("alpha", event);
    expect(stored.accepted).toEqual([...expected.accepted].sort());
    expect(stored.refused).toEqual(Object.fromEntries(expected.refused.map((r) => [r.cid, r.reason])));

    // alpha keeps beta's signed report as proof.
    const row = await alphaHs.relay.db.kysely.selectFrom("reports").selectAll().where("destination", "=", "beta").where("ref", "=", event)
      .executeTakeFirstOrThrow();
    expect({ accepted: row.accepted, refused: row.refused }).toEqual({ accepted: expected.accepted, refused: expected.refused });
    const header = decodeProtectedHeader(row.token);
    expect(header).toEqual({ alg: "EdDSA", typ: REPORT_TYP, kid: expect.stringMatching(/^beta#/) });
    expect(header.typ).toBe("fedrelay-report+jwt");
    expect(header.kid).toBe(beta.key.kid);
    const verified = await compactVerify(row.token, createPublicKey({ key: beta.publicJwk as never, format: "jwk" }));
    const claims = JSON.parse(new TextDecoder().decode(verified.payload)) as Record<string, unknown>;
    expect(claims).toEqual({
      iss: "beta", aud: "alpha", jti: row.jti, iat: expect.any(Number), ref: event, accepted: expected.accepted, refused: expected.refused,
    });
  });

  /** Every event that passed steps 1–5 has had its report published (or its failure counted): nothing in flight. */
  async function betaReportsSettled(): Promise<number> {
    const m = betaHs.relay.metrics;
    return eventually(async () => {
      const sent = await counterValue(m.reportsSent);
      const failed = await counterValue(m.reportFailures);
      const due = (await counterValue(m.eventsAccepted)) + (await counterValue(m.eventsRefused, "duplicate"));
      return sent + failed === due && sent;
    }, 15_000, "beta's reports to settle");
  }

  /** Captures beta's report tokens to alpha off the wire (a core subscription sees JetStream publishes too). */
  function captureReports(): { tokens: string[]; stop(): void } {
    const sub = client.nc.subscribe(reportSubject("alpha", "beta"));
    const tokens: string[] = [];
    void (async () => { for await (const m of sub) tokens.push(m.string()); })();
    return { tokens, stop: () => sub.unsubscribe() };
  }

  it("a duplicate (re-signed, different bytes) is reported again with the original decision", async () => {
    const [ok, late] = await Promise.all([member("dup-ok"), member("dup-late")]);
    const nocap = uniq("dup-nocap");
    const sentBefore = await betaReportsSettled();
    const capture = captureReports();
    try {
      const first = await send(alpha, [{ cid: ok!.id, cap: ok!.caps[CLIMBING]! }, { cid: nocap }], CLIMBING);
      await decided("alpha", first.claims.jti);
      const resigned = await signEvent({ ...first.claims, iat: first.claims.iat - 1 }, alpha.key);
      expect(resigned).not.toBe(first.token);
      await publish(betaHs, alpha, resigned);

      const reports = await eventually(async () => {
        const mine = capture.tokens.map((t) => decodeJwt(t)).filter((c) => c.ref === first.claims.jti);
        return mine.length >= 2 && mine;
      }, 15_000, "two reports");
      const original = { accepted: [ok!.id], refused: [{ cid: nocap, reason: "no_capability" }] };
      for (const r of reports) expect({ iss: r.iss, aud: r.aud, accepted: r.accepted, refused: r.refused }).toEqual({ iss: "beta", aud: "alpha", ...original });
      expect(reports[0]!.jti).not.toBe(reports[1]!.jti);
      expect(await betaReportsSettled()).toBe(sentBefore + 2);

      // Stored once at beta; alpha keeps one report per (destination, ref), with the right content.
      expect(await decided("alpha", first.claims.jti)).toEqual({ accepted: [ok!.id], refused: { [nocap]: "no_capability" } });
      const rows = await eventually(async () => {
        const r = await alphaHs.relay.db.kysely.selectFrom("reports").select(["accepted", "refused"]).where("ref", "=", first.claims.jti).execute();
        return r.length > 0 && r;
      });
      expect(rows).toEqual([original]);
      expect(await inbox(ok!)).toEqual([first.claims.jti]);
      expect(await inbox(late!)).toEqual([]);
    } finally {
      capture.stop();
    }
  });

  it("a duplicate whose recipient list differs is reported with the original decision, not as accepted for clients that got nothing", async () => {
    const [ok, late] = await Promise.all([member("dup2-ok"), member("dup2-late")]);
    const capture = captureReports();
    try {
      const first = await send(alpha, [{ cid: ok!.id, cap: ok!.caps[CLIMBING]! }], CLIMBING);
      await decided("alpha", first.claims.jti);
      // Its report sent first: a duplicate arriving while it is still queued shares it (one report).
      await eventually(async () => capture.tokens.some((t) => decodeJwt(t).ref === first.claims.jti), 15_000, "the first report");
      // The owner reuses the event id with one more member (say, a retried fan-out after a join).
      const changed = await signEvent({ ...first.claims, iat: first.claims.iat - 1, rcpt: [...first.claims.rcpt, { cid: late!.id, cap: late!.caps[CLIMBING]! }] }, alpha.key);
      await publish(betaHs, alpha, changed);
      const reports = await eventually(async () => {
        const mine = capture.tokens.map((t) => decodeJwt(t)).filter((c) => c.ref === first.claims.jti);
        return mine.length >= 2 && mine;
      }, 15_000, "two reports");
      expect(await inbox(late!)).toEqual([]);
      // late was not accepted: the duplicate stored nothing for it.
      for (const r of reports) expect({ accepted: r.accepted, refused: r.refused }).toEqual({ accepted: [ok!.id], refused: [] });
    } finally {
      capture.stop();
    }
  });
});

describe("capabilities API (DESIGN §6, §9)", () => {
  const caps = (hs = betaHs) => `${hs.relay.url}/v1/capabilities`;

  it("POST /v1/capabilities issues a secret once (201); GET lists the client's own without any secret", async () => {
    const mia = await member("mia", []);
    const ned = await member("ned", []);
    const res = await http(caps(), { method: "POST", token: mia.token, body: { group: CLIMBING } });
    expect(res).toEqual({
      status: 201,
      json: { id: expect.any(String), capability: expect.stringMatching(/^[A-Za-z0-9_-]{43}$/), group: CLIMBING, owner: "alpha", client: mia.id, created_at: expect.any(String), revoked_at: null },
    });
    expect(Buffer.from(res.json.capability as string, "base64url")).toHaveLength(32);
    await http(caps(), { method: "POST", token: ned.token, body: { group: CLIMBING } });

    const list = await http(caps(), { token: mia.token });
    expect(list).toEqual({ status: 200, json: { capabilities: [{ id: res.json.id, group: CLIMBING, owner: "alpha", client: mia.id, created_at: res.json.created_at, revoked_at: null }] } });
    expect(JSON.stringify(list.json)).not.toContain(res.json.capability as string);
    // The backend's view of the same client does not hold the secret either.
    const backend = await http(`${betaHs.relay.url}/v1/clients/${mia.id}/capabilities`, { token: SERVICE_TOKEN });
    expect(backend.json).toEqual(list.json);
    // Only a hash of the secret is stored.
    const row = await betaHs.relay.db.kysely.selectFrom("capabilities").selectAll().where("id", "=", res.json.id as string).executeTakeFirstOrThrow();
    expect(row.hash).toHaveLength(32);
    expect(JSON.stringify(row)).not.toContain(res.json.capability as string);
    expect(row.hash.toString("base64url")).not.toBe(res.json.capability);

    const { claims } = await send(alpha, [{ cid: mia.id, cap: res.json.capability as string }], CLIMBING);
    expect(await decided("alpha", claims.jti)).toEqual({ accepted: [mia.id], refused: {} });
  });

  it("a client cannot revoke another client's capability (404, as for an unknown id), and it stays usable", async () => {
    const oli = await member("oli", []);
    const pam = await member("pam", []);
    const issued = await http(caps(), { method: "POST", token: oli.token, body: { group: CLIMBING } });
    const id = issued.json.id as string;
    const foreign = await http(`${caps()}/${id}`, { method: "DELETE", token: pam.token });
    const unknown = await http(`${caps()}/${randomBytes(8).toString("hex")}`, { method: "DELETE", token: pam.token });
    expectError(foreign, 404, "not_found");
    expectError(unknown, 404, "not_found");
    expect(((await http(caps(), { token: oli.token })).json.capabilities as { revoked_at: string | null }[])[0]!.revoked_at).toBeNull();

    const { claims } = await send(alpha, [{ cid: oli.id, cap: issued.json.capability as string }], CLIMBING);
    expect(await decided("alpha", claims.jti)).toEqual({ accepted: [oli.id], refused: {} });
  });

  it("revoking twice is idempotent: 204 both times, and the first revocation time is kept", async () => {
    const quin = await member("quin", []);
    const issued = await http(caps(), { method: "POST", token: quin.token, body: { group: CLIMBING } });
    const url = `${caps()}/${issued.json.id as string}`;
    expect((await http(url, { method: "DELETE", token: quin.token })).status).toBe(204);
    const first = ((await http(caps(), { token: quin.token })).json.capabilities as { revoked_at: string | null }[])[0]!.revoked_at;
    expect(first).toEqual(expect.any(String));
    expect((await http(url, { method: "DELETE", token: quin.token })).status).toBe(204);
    const second = ((await http(caps(), { token: quin.token })).json.capabilities as { revoked_at: string | null }[])[0]!.revoked_at;
    expect(second).toBe(first);
  });

  it("the backend issues, lists and revokes a client's capabilities with the service token; a client token or unknown client is refused", async () => {
    const rue = await member("rue", []);
    const sam = await member("sam", []);
    const base = `${betaHs.relay.url}/v1/clients/${rue.id}/capabilities`;
    const issued = await http(base, { method: "POST", token: SERVICE_TOKEN, body: { group: BOULDERING } });
    expect(issued).toEqual({
      status: 201,
      json: { id: expect.any(String), capability: expect.any(String), group: BOULDERING, owner: "alpha", client: rue.id, created_at: expect.any(String), revoked_at: null },
    });
    const listed = await http(base, { token: SERVICE_TOKEN });
    expect(listed).toEqual({ status: 200, json: { capabilities: [{ id: issued.json.id, group: BOULDERING, owner: "alpha", client: rue.id, created_at: issued.json.created_at, revoked_at: null }] } });
    // The client sees it as its own.
    expect((await http(caps(), { token: rue.token })).json).toEqual(listed.json);

    const ok = await send(alpha, [{ cid: rue.id, cap: issued.json.capability as string }], BOULDERING);
    expect(await decided("alpha", ok.claims.jti)).toEqual({ accepted: [rue.id], refused: {} });

    // Not under another client's path, and not with a client token.
    expectError(await http(`${betaHs.relay.url}/v1/clients/${sam.id}/capabilities/${issued.json.id as string}`, { method: "DELETE", token: SERVICE_TOKEN }), 404, "not_found");
    expectError(await http(`${base}/${issued.json.id as string}`, { method: "DELETE", token: rue.token }), 401, "unauthorized");
    expectError(await http(base, { method: "POST", token: rue.token, body: { group: CLIMBING } }), 401, "unauthorized");
    expectError(await http(base, { token: rue.token }), 401, "unauthorized");
    expectError(await http(`${betaHs.relay.url}/v1/clients/${uniq("nobody")}/capabilities`, { method: "POST", token: SERVICE_TOKEN, body: { group: CLIMBING } }), 404, "not_found");

    expect((await http(`${base}/${issued.json.id as string}`, { method: "DELETE", token: SERVICE_TOKEN })).status).toBe(204);
    expect(((await http(base, { token: SERVICE_TOKEN })).json.capabilities as { revoked_at: string | null }[])[0]!.revoked_at).toEqual(expect.any(String));
    const after = await send(alpha, [{ cid: rue.id, cap: issued.json.capability as string }], BOULDERING);
    expect(await decided("alpha", after.claims.jti)).toEqual({ accepted: [], refused: { [rue.id]: "capability_revoked" } });
  });

  it("a request for a malformed group is 400 bad_request, on the client and the backend route", async () => {
    const tom = await member("tom", []);
    const bodies: unknown[] = [{ group: "no-owner" }, { group: "@alpha" }, { group: "x@Alpha" }, { group: "x y@alpha" }, { group: 7 }, {}, { group: CLIMBING, extra: 1 }];
    for (const body of bodies) {
      for (const [url, token] of [[caps(), tom.token], [`${betaHs.relay.url}/v1/clients/${tom.id}/capabilities`, SERVICE_TOKEN]] as const) {
        const res = await http(url, { method: "POST", token, body });
        expect({ body, url, status: res.status, error: res.json.error }).toEqual({ body, url, status: 400, error: "bad_request" });
      }
    }
    expect((await http(caps(), { token: tom.token })).json).toEqual({ capabilities: [] });
  });
});

describe("scale: 1,000 recipients in one event", () => {
  const GROUP = "crowd@alpha";
  const ids = Array.from({ length: 1000 }, (_, i) => `crowd-${String(i).padStart(4, "0")}`);
  const capOf = new Map<string, string>();

  beforeAll(async () => {
    const db = betaHs.relay.db;
    for (let i = 0; i < ids.length; i += 100) {
      await Promise.all(ids.slice(i, i + 100).map(async (id) => {
        await registerClient(db, id);
        capOf.set(id, (await issueCapability(db, id, GROUP, "alpha")).capability);
      }));
    }
  });

  async function perClient(jti: string): Promise<{ deliveries: number; clients: number; maxPerClient: number; refusals: Record<string, number> }> {
    const db = betaHs.relay.db.kysely;
    const d = await sql<{ n: string; clients: string; max: string | null }>`
      SELECT count(*) AS n, count(DISTINCT client_id) AS clients, max(c) AS max
      FROM (SELECT client_id, count(*) OVER (PARTITION BY client_id) AS c FROM deliveries WHERE iss = 'alpha' AND jti = ${jti}) x`.execute(db);
    const r = await db.selectFrom("all_recipient_refusals").select(["reason", (eb) => eb.fn.countAll<string>().as("n")])
      .where("iss", "=", "alpha").where("jti", "=", jti).groupBy("reason").execute();
    return {
      deliveries: Number(d.rows[0]!.n), clients: Number(d.rows[0]!.clients), maxPerClient: Number(d.rows[0]!.max ?? 0),
      refusals: Object.fromEntries(r.map((x) => [x.reason, Number(x.n)])),
    };
  }

  it("an event to 1,000 clients that each hold a capability delivers to every one exactly once", async () => {
    const res = await fanout({ group: GROUP, body: b64("everyone"), recipients: at(ids.map((id) => ({ client: id, cap: capOf.get(id) }))) }, "?wait=10");
    expect(res.status).toBe(200);
    const event = res.json.id as string;
    expect(res.json.events).toEqual([{ server: "beta", event, recipients: 1000, published: true, duplicate: false }]);
    expect(res.json.reports).toEqual([{ server: "beta", event, accepted: ids, refused: [] }]);
    expect(await perClient(event)).toEqual({ deliveries: 1000, clients: 1000, maxPerClient: 1, refusals: {} });
    for (const id of [ids[0]!, ids[999]!]) {
      const m: Member = { id, token: await addClient(betaHs, id), caps: {} };
      expect(await inbox(m)).toEqual([event]);
    }
  });

  it("an event to 1,000 clients where every other one has no capability accepts 500 and refuses 500 no_capability", async () => {
    const recipients = ids.map((id, i) => ({ client: id, cap: i % 2 === 0 ? capOf.get(id) : undefined }));
    const res = await fanout({ group: GROUP, body: b64("half"), recipients: at(recipients) }, "?wait=10");
    expect(res.status).toBe(200);
    const event = res.json.id as string;
    expect(await perClient(event)).toEqual({ deliveries: 500, clients: 500, maxPerClient: 1, refusals: { no_capability: 500 } });
    const refusedIds = await betaHs.relay.db.kysely.selectFrom("all_recipient_refusals").select("client_id")
      .where("iss", "=", "alpha").where("jti", "=", event).orderBy("client_id").execute();
    expect(refusedIds.map((r) => r.client_id)).toEqual(ids.filter((_, i) => i % 2 === 1));
    expect(res.json.reports).toEqual([{
      server: "beta", event,
      accepted: ids.filter((_, i) => i % 2 === 0),
      refused: ids.filter((_, i) => i % 2 === 1).map((cid) => ({ cid, reason: "no_capability" })),
    }]);
  });
});

describe("server-level policy (DESIGN §2, §5 step 2)", () => {
  let chat: Identity, deep: Identity, apex: Identity, spam: Identity, bad: Identity;
  let denyHs: TestHomeserver, allowHs: TestHomeserver, opsHs: TestHomeserver;

  beforeAll(async () => {
    [chat, deep, apex, spam, bad] = await Promise.all([
      identity("chat.example.org"), identity("eu.chat.example.org"), identity("example.org"), identity("spam.net"), identity("bad.example.org"),
    ]);
    const [denyId, allowId, opsId] = await Promise.all([identity("deny-dest"), identity("allow-dest"), identity("ops-dest")]);
    [denyHs, allowHs, opsHs] = await Promise.all([
      startHomeserver(denyId, {
        natsUrl: nats.url, peers: [alpha, chat, deep, apex, spam],
        overrides: { policy: { deny: ["spam.net", "*.example.org"] } },
      }),
      startHomeserver(allowId, {
        natsUrl: nats.url, peers: [alpha, gamma, chat, bad],
        overrides: { policy: { mode: "allowlist", allow: ["alpha", "*.example.org"], deny: ["bad.example.org"] } },
      }),
      startHomeserver(opsId, { natsUrl: nats.url, peers: [alpha, gamma, chat] }),
    ]);
  });

  afterAll(async () => {
    await Promise.all([denyHs?.close(), allowHs?.close(), opsHs?.close()]);
  });

  /** A client of `hs` with a capability for each sender's `g@<sender>` group. */
  async function resident(hs: TestHomeserver, senders: readonly Identity[]): Promise<Member> {
    return member("res", senders.map((s) => `g@${s.name}`), hs);
  }

  /** `from` sends to `m` at `hs`; resolves to "delivered" or the event-level reason. */
  async function outcome(hs: TestHomeserver, from: Identity, m: Member): Promise<string> {
    const { claims, seq } = await send(from, [{ cid: m.id, cap: m.caps[`g@${from.name}`]! }], `g@${from.name}`, hs);
    const result = await eventually(async () => {
      if (await eventStored(from.name, claims.jti, hs)) return "delivered";
      const row = await hs.relay.db.kysely.selectFrom("refused_events").select(["reason", "claimed_iss", "claimed_jti"])
        .where("stream_seq", "=", String(seq)).executeTakeFirst();
      if (!row) return undefined;
      expect(row).toMatchObject({ claimed_iss: from.name, claimed_jti: claims.jti });
      return row.reason;
    }, 15_000, `outcome of ${from.name}'s event`);
    if (result === "delivered") expect(await decided(from.name, claims.jti, hs)).toEqual({ accepted: [m.id], refused: {} });
    return result;
  }

  async function outcomes(hs: TestHomeserver, m: Member, senders: readonly Identity[]): Promise<Record<string, string>> {
    const out: Record<string, string> = {};
    for (const s of senders) out[s.name] = await outcome(hs, s, m);
    return out;
  }

  it("deny rules refuse an exact name and every name under *.example.org as sender_denied, and store nothing of theirs", async () => {
    const m = await resident(denyHs, [alpha, chat, deep, apex, spam]);
    expect(await outcomes(denyHs, m, [alpha, chat, deep, apex, spam])).toEqual({
      "alpha": "delivered",
      "chat.example.org": "sender_denied",
      "eu.chat.example.org": "sender_denied",
      // *.example.org covers the names under example.org, not example.org itself.
      "example.org": "delivered",
      "spam.net": "sender_denied",
    });
    const stored = await denyHs.relay.db.kysely.selectFrom("events").select("iss").distinct().orderBy("iss").execute();
    expect(stored.map((r) => r.iss)).toEqual(["alpha", "example.org"]);
    expect((await inbox(m, denyHs)).length).toBe(2);
    expect(await counterValue(denyHs.relay.metrics.eventsRefused, "sender_denied")).toBe(3);
  });

  it("allow-list mode delivers from listed senders, refuses an unlisted known peer sender_denied, and deny wins over allow", async () => {
    const m = await resident(allowHs, [alpha, gamma, chat, bad]);
    expect(await outcomes(allowHs, m, [alpha, gamma, chat, bad])).toEqual({
      "alpha": "delivered",
      "gamma": "sender_denied", // federated, but not on the list
      "chat.example.org": "delivered", // allowed by *.example.org
      "bad.example.org": "sender_denied", // allowed by *.example.org, denied by name: deny wins
    });
    const policy = await http(`${allowHs.relay.url}/v1/admin/policy`, { token: SERVICE_TOKEN });
    expect(policy).toEqual({ status: 200, json: { mode: "allowlist", allow: ["alpha", "*.example.org"], deny: ["bad.example.org"], runtime: { rules: [] } } });
  });

  it("admin API rule and mode changes apply to the next event without a restart, and GET /v1/admin/policy shows them", async () => {
    const admin = (path: string, init: { method?: string; body?: unknown } = {}) =>
      http(`${opsHs.relay.url}/v1/admin/policy${path}`, { token: SERVICE_TOKEN, ...init });
    const m = await resident(opsHs, [alpha, gamma, chat]);
    expect(await admin("")).toEqual({ status: 200, json: { mode: "open", allow: [], deny: [], runtime: { rules: [] } } });
    expect(await outcome(opsHs, gamma, m)).toBe("delivered");

    expect(await admin("/rules/gamma", { method: "PUT", body: { action: "deny" } })).toEqual({ status: 200, json: { pattern: "gamma", action: "deny" } });
    expect(await admin("/rules/*.example.org", { method: "PUT", body: { action: "deny" } })).toEqual({ status: 200, json: { pattern: "*.example.org", action: "deny" } });
    expect(await admin("")).toEqual({
      status: 200,
      json: { mode: "open", allow: [], deny: ["*.example.org", "gamma"], runtime: { rules: [{ pattern: "*.example.org", action: "deny" }, { pattern: "gamma", action: "deny" }] } },
    });
    expect(await outcomes(opsHs, m, [gamma, chat, alpha])).toEqual({ "gamma": "sender_denied", "chat.example.org": "sender_denied", "alpha": "delivered" });

    expect((await admin("/rules/gamma", { method: "DELETE" })).status).toBe(204);
    expectError(await admin("/rules/gamma", { method: "DELETE" }), 404, "not_found");
    expect(await outcome(opsHs, gamma, m)).toBe("delivered");

    expect(await admin("/mode", { method: "PUT", body: { mode: "allowlist" } })).toEqual({ status: 200, json: { mode: "allowlist" } });
    expect(await outcome(opsHs, alpha, m)).toBe("sender_denied");
    expect(await admin("/rules/alpha", { method: "PUT", body: { action: "allow" } })).toEqual({ status: 200, json: { pattern: "alpha", action: "allow" } });
    expect(await admin("")).toEqual({
      status: 200,
      json: { mode: "allowlist", allow: ["alpha"], deny: ["*.example.org"], runtime: { mode: "allowlist", rules: [{ pattern: "*.example.org", action: "deny" }, { pattern: "alpha", action: "allow" }] } },
    });
    expect(await outcomes(opsHs, m, [alpha, gamma])).toEqual({ alpha: "delivered", gamma: "sender_denied" });

    // Deny wins over allow at run time too: an allowed wildcard with one name denied.
    expect((await admin("/rules/*.example.org", { method: "PUT", body: { action: "allow" } })).json).toEqual({ pattern: "*.example.org", action: "allow" });
    expect(await outcome(opsHs, chat, m)).toBe("delivered");
    expect((await admin("/rules/chat.example.org", { method: "PUT", body: { action: "deny" } })).status).toBe(200);
    expect(await outcome(opsHs, chat, m)).toBe("sender_denied");

    expect(await admin("/mode", { method: "PUT", body: { mode: "open" } })).toEqual({ status: 200, json: { mode: "open" } });
    expect(await outcome(opsHs, gamma, m)).toBe("delivered");
  });

  it("the admin API refuses a bad pattern, action or mode with 400 and a client token with 401, changing nothing", async () => {
    const before = await http(`${opsHs.relay.url}/v1/admin/policy`, { token: SERVICE_TOKEN });
    for (const [path, body] of [
      ["/rules/Not_A_Name", { action: "deny" }],
      ["/rules/*", { action: "deny" }],
      ["/rules/*.*.example.org", { action: "deny" }],
      ["/rules/gamma", { action: "block" }],
      ["/rules/gamma", {}],
      ["/mode", { mode: "closed" }],
    ] as const) {
      expectError(await http(`${opsHs.relay.url}/v1/admin/policy${path}`, { method: "PUT", token: SERVICE_TOKEN, body }), 400, "bad_request");
    }
    const m = await resident(opsHs, []);
    expectError(await http(`${opsHs.relay.url}/v1/admin/policy/rules/gamma`, { method: "PUT", token: m.token, body: { action: "deny" } }), 401, "unauthorized");
    expectError(await http(`${opsHs.relay.url}/v1/admin/policy`, { token: m.token }), 401, "unauthorized");
    expect(await http(`${opsHs.relay.url}/v1/admin/policy`, { token: SERVICE_TOKEN })).toEqual(before);
  });
});
