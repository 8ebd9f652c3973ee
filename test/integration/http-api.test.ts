import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SignJWT } from "jose";
import { createClientTokens } from "../../src/client-tokens.ts";
import { startLocalNats, type LocalNats } from "../../src/local-nats.ts";
import { CLIENT_TOKEN_TYP, EVENT_TYP } from "../../src/protocol/claims.ts";
import { signToken } from "../../src/protocol/sign.ts";
import { clientExists, clientRegistration } from "../../src/store/clients.ts";
import { signingTokenKey } from "../../src/store/client-token-keys.ts";
import {
  addClient, eventually, grantCapability, http, identity, SERVICE_TOKEN, startHomeserver,
  type Identity, type TestHomeserver,
} from "../helpers/federation.ts";
import { metricValue } from "../helpers/metrics.ts";

let nats: LocalNats;
let alpha: Identity, beta: Identity, gamma: Identity;
let alphaHs: TestHomeserver, betaHs: TestHomeserver, gammaHs: TestHomeserver;

beforeAll(async () => {
  nats = await startLocalNats();
  [alpha, beta, gamma] = await Promise.all([identity("alpha"), identity("beta"), identity("gamma")]);
  alphaHs = await startHomeserver(alpha, { natsUrl: nats.url, peers: [beta, gamma] });
  betaHs = await startHomeserver(beta, { natsUrl: nats.url, peers: [alpha, gamma] });
  gammaHs = await startHomeserver(gamma, { natsUrl: nats.url, peers: [alpha, beta], roles: { api: true, worker: false } });
});

afterAll(async () => {
  await gammaHs?.close();
  await betaHs?.close();
  await alphaHs?.close();
  await nats?.stop();
});

// Every test uses its own clients on the shared homeservers.
let counter = 0;
const uniq = (prefix: string): string => `${prefix}-${++counter}`;

const GROUP = "chat@alpha";
/** Each member's delivery capability for GROUP, issued by beta's backend (DESIGN §6) and presented by alpha. */
const capabilities = new Map<string, string>();

/** Registers a client of beta that is a member of alpha's GROUP; returns its bearer token. */
async function member(clientId: string): Promise<string> {
  const token = await addClient(betaHs, clientId);
  capabilities.set(clientId, await grantCapability(betaHs, clientId, GROUP));
  return token;
}

function recipient(client: string): { server: string; client: string; capability?: string } {
  const capability = capabilities.get(client);
  return { server: "beta", client, ...(capability === undefined ? {} : { capability }) };
}

const b64 = (text: string | Buffer): string => Buffer.from(text).toString("base64url");
const text = (body: string): string => Buffer.from(body, "base64url").toString("utf8");

interface Message {
  readonly cursor: number;
  readonly from: string;
  readonly group: string;
  readonly event: string;
  readonly body: string;
}
interface Page {
  readonly messages: Message[];
  readonly next: number | null;
}

/** A raw request: any Authorization header, and the response's content type. */
async function call(url: string, init: { method?: string; headers?: Record<string, string>; body?: string } = {}) {
  const res = await fetch(url, { method: init.method ?? "GET", headers: init.headers ?? {}, ...(init.body === undefined ? {} : { body: init.body }) });
  const body = await res.text();
  return { status: res.status, contentType: res.headers.get("content-type") ?? "", headers: res.headers, body };
}

function expectError(res: { status: number; json: Record<string, unknown> }, status: number, code: string, message?: RegExp): void {
  expect({ status: res.status, json: res.json }).toEqual({ status, json: { error: code, message: expect.any(String) } });
  if (message) expect(res.json.message).toMatch(message);
}

function fanout(body: unknown, token: string | undefined = SERVICE_TOKEN) {
  return http(`${alphaHs.relay.url}/v1/fanout`, { method: "POST", ...(token === undefined ? {} : { token }), body });
}

/** Alpha fans out one message to clients of beta; returns the event id. */
async function send(clients: readonly string[], body: string, extra: Record<string, unknown> = {}): Promise<string> {
  const res = await fanout({ group: GROUP, body: b64(body), recipients: clients.map(recipient), ...extra });
  expect(res.status).toBe(200);
  return res.json.id as string;
}

async function page(token: string, query = ""): Promise<Page> {
  const res = await http(`${betaHs.relay.url}/v1/messages${query}`, { token });
  expect(res.status).toBe(200);
  return res.json as unknown as Page;
}

async function waitForMessages(token: string, n: number): Promise<Message[]> {
  return eventually(async () => {
    const { messages } = await page(token);
    return messages.length >= n && messages;
  }, 15_000, `${n} messages`);
}

function ack(token: string, through: unknown) {
  return http(`${betaHs.relay.url}/v1/messages/ack`, { method: "POST", token, body: { through } });
}

async function deliveriesFor(clientId: string): Promise<number> {
  const row = await betaHs.relay.db.kysely.selectFrom("deliveries").select((eb) => eb.fn.countAll<string>().as("n"))
    .where("client_id", "=", clientId).executeTakeFirstOrThrow();
  return Number(row.n);
}

/** A token minted by `hs` itself (its own key and the client's registration), at another time or lifetime. */
function mintAt(hs: TestHomeserver, clientId: string, now: number, ttlSeconds: number): Promise<string> {
  return createClientTokens({ self: hs.id.name, db: hs.relay.db, ttlSeconds, now: () => now }).mint(clientId).then((t) => t.token);
}

/** A token with any claims, signed with `hs`'s real client-token secret: only the claims can make it wrong. */
async function signedWithRealKey(hs: TestHomeserver, claims: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
  const key = await signingTokenKey(hs.relay.db);
  return new SignJWT(claims).setProtectedHeader({ alg: "HS256", typ: CLIENT_TOKEN_TYP, kid: key.id, ...header }).sign(key.secret);
}

describe("authentication: every refusal is 401 { error: unauthorized, message }", () => {
  it("refuses requests without an Authorization header on client and service routes, as JSON", async () => {
    const routes: [string, string, string][] = [
      ["GET", betaHs.relay.url, "/v1/messages"],
      ["POST", betaHs.relay.url, "/v1/messages/ack"],
      ["POST", alphaHs.relay.url, "/v1/fanout"],
      ["PUT", betaHs.relay.url, "/v1/clients/someone"],
      ["POST", betaHs.relay.url, "/v1/clients/someone/tokens"],
    ];
    for (const [method, base, path] of routes) {
      const hasBody = method !== "GET" && method !== "PUT";
      const res = await call(`${base}${path}`, {
        method,
        ...(hasBody ? { headers: { "content-type": "application/json" }, body: "{}" } : {}),
      });
      expect({ route: `${method} ${path}`, status: res.status }).toEqual({ route: `${method} ${path}`, status: 401 });
      expect(res.contentType).toMatch(/^application\/json/);
      expect(JSON.parse(res.body)).toEqual({ error: "unauthorized", message: expect.stringMatching(/Authorization/) });
    }
    expect(await clientExists(betaHs.relay.db, "someone")).toBe(false);
  });

  it("refuses Authorization headers that are not a single bearer token", async () => {
    for (const header of ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer ", "bearer abc", "Bearer a b", `Token ${SERVICE_TOKEN}`]) {
      const res = await call(`${betaHs.relay.url}/v1/messages`, { headers: { authorization: header } });
      expect({ header, status: res.status, json: JSON.parse(res.body) as unknown })
        .toEqual({ header, status: 401, json: { error: "unauthorized", message: expect.any(String) } });
    }
  });

  it("refuses a garbage bearer token from a client and from the backend", async () => {
    for (const token of ["garbage", "a.b.c", "eyJhbGciOiJFZERTQSJ9.e30.AAAA", SERVICE_TOKEN]) {
      expectError(await http(`${betaHs.relay.url}/v1/messages`, { token }), 401, "unauthorized", /client token/);
    }
    expectError(await fanout({ group: "chat@alpha", body: b64("x"), recipients: [{ server: "beta", client: "x" }] }, "garbage"), 401, "unauthorized");
  });

  it("refuses a client token minted by another homeserver, even for a client id that exists here", async () => {
    const id = uniq("shared");
    const betaToken = await addClient(betaHs, id);
    const gammaToken = await addClient(gammaHs, id);
    // alpha is a federated peer: beta trusts its key for events, never for its clients.
    const alphaToken = await addClient(alphaHs, id);
    expect((await http(`${betaHs.relay.url}/v1/messages`, { token: betaToken })).status).toBe(200);
    for (const token of [gammaToken, alphaToken]) {
      expectError(await http(`${betaHs.relay.url}/v1/messages`, { token }), 401, "unauthorized", /invalid client token/);
      expectError(await http(`${betaHs.relay.url}/v1/messages/ack`, { method: "POST", token, body: { through: 0 } }), 401, "unauthorized");
    }
  });

  it("refuses a token naming this homeserver but signed with a key it does not hold, or with its federation key", async () => {
    const id = uniq("forged");
    await addClient(betaHs, id);
    const now = Math.floor(Date.now() / 1000);
    const reg = await clientRegistration(betaHs.relay.db, id);
    const claims = { iss: "beta", aud: "beta", sub: id, reg, iat: now, exp: now + 600 };
    const realKid = (await signingTokenKey(betaHs.relay.db)).id;
    // Another secret under beta's own kid, and under a kid beta never had.
    const otherSecret = new SignJWT(claims).setProtectedHeader({ alg: "HS256", typ: CLIENT_TOKEN_TYP, kid: realKid }).sign(Buffer.alloc(32, 7));
    const unknownKid = new SignJWT(claims).setProtectedHeader({ alg: "HS256", typ: CLIENT_TOKEN_TYP, kid: "made-up" }).sign(Buffer.alloc(32, 7));
    // Client tokens as they were before: EdDSA under the federation signing key, which must mean nothing to the API.
    const federationKey = signToken(claims, CLIENT_TOKEN_TYP, beta.key);
    for (const token of await Promise.all([otherSecret, unknownKid, federationKey])) {
      expectError(await http(`${betaHs.relay.url}/v1/messages`, { token }), 401, "unauthorized", /invalid client token/);
    }
  });

  it("refuses an expired client token, a token of another type, a token for an unregistered client and one outliving the token lifetime", async () => {
    const id = uniq("stale");
    await addClient(betaHs, id);
    const now = Math.floor(Date.now() / 1000);
    const reg = await clientRegistration(betaHs.relay.db, id);
    const ttl = betaHs.config.http.clientTokenTtlSeconds;
    const cases: [string, string, RegExp][] = [
      ["expired", await mintAt(betaHs, id, now - 7200, 60), /exp/],
      ["an event's typ", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, reg, iat: now, exp: now + 600 }, { typ: EVENT_TYP }), /not a fedrelay-client\+jwt/],
      ["another audience", await signedWithRealKey(betaHs, { iss: "beta", aud: "gamma", sub: id, reg, iat: now, exp: now + 600 }), /aud/],
      ["no registration", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, iat: now, exp: now + 600 }), /reg/],
      ["another registration", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, reg: "00000000-0000-4000-8000-000000000000", iat: now, exp: now + 600 }), /revoked/],
      ["an unregistered client", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: uniq("ghost"), reg, iat: now, exp: now + 600 }), /revoked/],
      // Made with the real key, but for a year: longer than any token this homeserver mints.
      ["365 days", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, reg, iat: now, exp: now + 365 * 86_400 }), new RegExp(`exceeds ${ttl}`)],
      ["from the future", await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, reg, iat: now + 600, exp: now + 1200 }), /future/],
    ];
    for (const [name, token, message] of cases) {
      const res = await http(`${betaHs.relay.url}/v1/messages`, { token });
      expect({ name, status: res.status, error: res.json.error }).toEqual({ name, status: 401, error: "unauthorized" });
      expect({ name, message: res.json.message }).toEqual({ name, message: expect.stringMatching(message) });
    }
    // The same claims done right are accepted: each case above differs in one thing.
    const good = await signedWithRealKey(betaHs, { iss: "beta", aud: "beta", sub: id, reg, iat: now, exp: now + 600 });
    expect((await http(`${betaHs.relay.url}/v1/messages`, { token: good })).status).toBe(200);
  });

  it("service routes refuse a client token and a wrong service token, and change nothing", async () => {
    const clientToken = await addClient(alphaHs, uniq("member"));
    const wrong = ["wrong-service-token-0123456789", `${SERVICE_TOKEN}x`, SERVICE_TOKEN.slice(0, -1), clientToken];
    const intruder = uniq("intruder");
    for (const token of wrong) {
      expectError(await fanout({ group: "chat@alpha", body: b64("x"), recipients: [{ server: "beta", client: "x" }] }, token), 401, "unauthorized");
      expectError(await http(`${betaHs.relay.url}/v1/clients/${intruder}`, { method: "PUT", token }), 401, "unauthorized");
      expectError(await http(`${betaHs.relay.url}/v1/clients/${intruder}/tokens`, { method: "POST", token }), 401, "unauthorized");
    }
    expect(await clientExists(betaHs.relay.db, intruder)).toBe(false);
  });
});

describe("request errors", () => {
  it("an unknown route or method is 404 not_found naming the route", async () => {
    expectError(await http(`${betaHs.relay.url}/v1/nope`), 404, "not_found", /GET \/v1\/nope/);
    expectError(await http(`${betaHs.relay.url}/v1/nope?x=1`, { token: SERVICE_TOKEN }), 404, "not_found", /no route GET \/v1\/nope$/);
    expectError(await http(`${betaHs.relay.url}/v1/messages`, { method: "DELETE", token: SERVICE_TOKEN }), 404, "not_found");
    expectError(await http(`${betaHs.relay.url}/`), 404, "not_found");
  });

  it("PUT /v1/clients/:id takes the id URL-encoded once: a valid id with / registers, an encoded % is 400 bad_request", async () => {
    const slashed = uniq("team/ann");
    const put = await http(`${betaHs.relay.url}/v1/clients/${encodeURIComponent(slashed)}`, { method: "PUT", token: SERVICE_TOKEN });
    expect(put).toEqual({ status: 201, json: { client: slashed, created: true } });
    // "a%41" and "%" are not client ids; decoding them a second time must not turn them into one, or into a 500.
    for (const id of ["a%41", "%"]) {
      const path = encodeURIComponent(id);
      expectError(await http(`${betaHs.relay.url}/v1/clients/${path}`, { method: "PUT", token: SERVICE_TOKEN }), 400, "bad_request");
      const tokens = await http(`${betaHs.relay.url}/v1/clients/${path}/tokens`, { method: "POST", token: SERVICE_TOKEN });
      expect(tokens.status).toBeGreaterThanOrEqual(400);
      expect(tokens.status).toBeLessThan(500);
    }
    expect(await clientExists(betaHs.relay.db, "aA")).toBe(false);
  });

  it("a malformed JSON body is 400 bad_request", async () => {
    const token = await addClient(betaHs, uniq("sloppy"));
    for (const raw of ["{not json", "{\"through\": 1", ""]) {
      expectError(await http(`${alphaHs.relay.url}/v1/fanout`, { method: "POST", token: SERVICE_TOKEN, raw }), 400, "bad_request");
      expectError(await http(`${betaHs.relay.url}/v1/messages/ack`, { method: "POST", token, raw }), 400, "bad_request");
    }
  });

  it("a fan-out failing validation is 400 bad_request with a message naming the field", async () => {
    const valid = { group: "chat@alpha", body: b64("hi"), recipients: [{ server: "beta", client: "bob" }] };
    const cases: [string, unknown, RegExp][] = [
      ["missing recipients", { group: valid.group, body: valid.body }, /recipients/],
      ["empty recipients", { ...valid, recipients: [] }, /recipients/],
      ["missing body", { group: valid.group, recipients: valid.recipients }, /body/],
      ["padded body", { ...valid, body: "aGk=" }, /body/],
      ["standard base64 body", { ...valid, body: "a+b/" }, /body/],
      ["non-canonical body", { ...valid, body: "aGl" }, /body/],
      ["bad server name", { ...valid, recipients: [{ server: "Beta_Server", client: "bob" }] }, /recipients\.0\.server/],
      ["bad client id", { ...valid, recipients: [{ server: "beta", client: "" }] }, /recipients\.0\.client/],
      ["bad group", { ...valid, group: "no-owner" }, /group/],
      ["negative seq", { ...valid, seq: -1 }, /seq/],
      ["bad id", { ...valid, id: "not an id" }, /\bid\b/],
      ["unknown field", { ...valid, colour: "blue" }, /colour/],
      ["unknown recipient field", { ...valid, recipients: [{ server: "beta", client: "bob", cap2: "x" }] }, /cap2/],
      ["not an object", [valid], /fan-out request/],
    ];
    for (const [name, body, field] of cases) {
      const res = await fanout(body);
      expect({ name, status: res.status, error: res.json.error }).toEqual({ name, status: 400, error: "bad_request" });
      expect(res.json).toEqual({ error: "bad_request", message: expect.stringMatching(field) });
    }
  });

  it("a fan-out for a group owned by another homeserver is 403 not_group_owner", async () => {
    for (const group of ["chat@beta", "chat@gamma"]) {
      const res = await fanout({ group, body: b64("hi"), recipients: [{ server: "beta", client: "bob" }] });
      expectError(res, 403, "not_group_owner", new RegExp(group.split("@")[1]!));
    }
  });

  it("a fan-out whose decoded body exceeds limits.maxBodyBytes is 413 payload_too_large; one at the limit is accepted", async () => {
    const limit = alphaHs.config.limits.maxBodyBytes;
    const recipients = [{ server: "beta", client: uniq("nobody") }];
    const over = await fanout({ group: "chat@alpha", body: b64(Buffer.alloc(limit + 1, 1)), recipients });
    expectError(over, 413, "payload_too_large", new RegExp(String(limit)));
    const at = await fanout({ group: "chat@alpha", body: b64(Buffer.alloc(limit, 1)), recipients });
    expect(at.status).toBe(200);
  });

  it("a request body over the HTTP body limit is 413 payload_too_large", async () => {
    const raw = JSON.stringify({ group: "chat@alpha", body: "A".repeat(17 * 1024 * 1024), recipients: [{ server: "beta", client: "bob" }] });
    expectError(await http(`${alphaHs.relay.url}/v1/fanout`, { method: "POST", token: SERVICE_TOKEN, raw }), 413, "payload_too_large");
  });

  it("GET /v1/messages refuses a bad after, limit or wait and unknown parameters with 400", async () => {
    const token = await addClient(betaHs, uniq("query"));
    const cases: [string, RegExp][] = [
      ["after=abc", /after/],
      ["after=-1", /after/],
      ["after=1.5", /after/],
      ["after=", /after/],
      ["after=1&after=2", /after/],
      ["limit=0", /limit/],
      ["limit=1001", /limit/],
      ["limit=abc", /limit/],
      ["limit=-5", /limit/],
      ["wait=abc", /wait/],
      ["wait=1.5", /wait/],
      ["colour=blue", /colour/],
    ];
    for (const [query, field] of cases) {
      const res = await http(`${betaHs.relay.url}/v1/messages?${query}`, { token });
      expect({ query, status: res.status, error: res.json.error }).toEqual({ query, status: 400, error: "bad_request" });
      expect(res.json.message).toMatch(field);
    }
    for (const query of ["limit=1", "limit=1000", "after=0", "after=999999999999999", "wait=0"]) {
      expect({ query, status: (await http(`${betaHs.relay.url}/v1/messages?${query}`, { token })).status }).toEqual({ query, status: 200 });
    }
  });

  it("POST /v1/messages/ack refuses a body that is not { through: cursor } with 400", async () => {
    const token = await addClient(betaHs, uniq("acker"));
    for (const body of [{}, { through: -1 }, { through: "0" }, { through: 1.5 }, { through: 0, extra: true }, [0], null]) {
      const res = await http(`${betaHs.relay.url}/v1/messages/ack`, { method: "POST", token, body });
      expect({ body, status: res.status, error: res.json.error }).toEqual({ body, status: 400, error: "bad_request" });
    }
  });
});

describe("client isolation", () => {
  it("a client sees only its own messages", async () => {
    const [a, b] = [uniq("ann"), uniq("ben")];
    const [tokenA, tokenB] = [await member(a), await member(b)];
    // Each committed before the next is sent: cursors follow commit order (see "cursors" below).
    await send([a], "for ann");
    await waitForMessages(tokenA, 1);
    await send([b], "for ben");
    await waitForMessages(tokenB, 1);
    await send([a, b], "for both");
    expect((await waitForMessages(tokenA, 2)).map((m) => text(m.body))).toEqual(["for ann", "for both"]);
    expect((await waitForMessages(tokenB, 2)).map((m) => text(m.body))).toEqual(["for ben", "for both"]);
  });

  it("acknowledging a cursor affects only the acknowledging client", async () => {
    const [a, b] = [uniq("ann"), uniq("ben")];
    const [tokenA, tokenB] = [await member(a), await member(b)];
    await send([a, b], "one");
    await send([a, b], "two");
    await send([b], "three");
    const messagesA = await waitForMessages(tokenA, 2);
    const messagesB = await waitForMessages(tokenB, 3);

    expect(await ack(tokenA, messagesA[1]!.cursor)).toEqual({ status: 200, json: { acked: messagesA[1]!.cursor } });
    expect((await page(tokenA)).messages).toEqual([]);
    expect((await page(tokenB)).messages).toEqual(messagesB);
    // B's third cursor was never handed to A: A cannot acknowledge it, and B keeps it.
    expectError(await ack(tokenA, messagesB[2]!.cursor), 400, "bad_cursor");
    expect((await page(tokenB)).messages).toEqual(messagesB);
    expect(await deliveriesFor(b)).toBe(3);
  });

  it("acknowledging beyond the last handed-out cursor is 400 bad_cursor and deletes nothing", async () => {
    const id = uniq("eager");
    const token = await member(id);
    await send([id], "one");
    await send([id], "two");
    const messages = await waitForMessages(token, 2);
    const last = messages[1]!.cursor;
    for (const through of [last + 1, Number.MAX_SAFE_INTEGER]) {
      expectError(await ack(token, through), 400, "bad_cursor", new RegExp(String(through)));
    }
    expect((await page(token)).messages).toEqual(messages);
    expect(await deliveriesFor(id)).toBe(2);
  });

  it("acknowledging the same cursor twice, or an older one, is harmless", async () => {
    const id = uniq("twice");
    const token = await member(id);
    expect(await ack(token, 0)).toEqual({ status: 200, json: { acked: 0 } });
    await send([id], "one");
    await send([id], "two");
    const [first, second] = await waitForMessages(token, 2);
    expect(await ack(token, first!.cursor)).toEqual({ status: 200, json: { acked: first!.cursor } });
    expect(await ack(token, first!.cursor)).toEqual({ status: 200, json: { acked: first!.cursor } });
    expect(await ack(token, 0)).toEqual({ status: 200, json: { acked: first!.cursor } });
    expect((await page(token)).messages).toEqual([second]);
    expect(await deliveriesFor(id)).toBe(1);
  });
});

describe("cursors", () => {
  it("after pages through messages in order, limit caps a page, and next is the last cursor of the page", async () => {
    const id = uniq("reader");
    const token = await member(id);
    // Cursors follow commit order, not publish order (two batches can be in flight): each
    // message is committed before the next is sent, so the five are in a known order.
    for (let i = 1; i <= 5; i++) {
      await send([id], `m${i}`, { seq: i });
      await waitForMessages(token, i);
    }
    const all = await waitForMessages(token, 5);
    expect(all.map((m) => text(m.body))).toEqual(["m1", "m2", "m3", "m4", "m5"]);
    expect(all.map((m) => m.cursor)).toEqual([...all.map((m) => m.cursor)].sort((x, y) => x - y));
    expect(new Set(all.map((m) => m.cursor)).size).toBe(5);

    const seen: string[] = [];
    let after: number | null = null;
    const pages: number[] = [];
    for (;;) {
      const p: Page = await page(token, `?limit=2${after === null ? "" : `&after=${after}`}`);
      if (p.messages.length === 0) {
        expect(p.next).toBe(after);
        break;
      }
      pages.push(p.messages.length);
      seen.push(...p.messages.map((m) => text(m.body)));
      expect(p.next).toBe(p.messages.at(-1)!.cursor);
      after = p.next;
    }
    expect(pages).toEqual([2, 2, 1]);
    expect(seen).toEqual(["m1", "m2", "m3", "m4", "m5"]);
    expect((await page(token, `?after=${all[2]!.cursor}`)).messages.map((m) => text(m.body))).toEqual(["m4", "m5"]);
  });

  it("a GET without after starts after the last acknowledged cursor", async () => {
    const id = uniq("resumer");
    const token = await member(id);
    // Committed one by one, so the four are in a known order (as in the test above).
    for (let i = 1; i <= 4; i++) {
      await send([id], `m${i}`);
      await waitForMessages(token, i);
    }
    const all = await waitForMessages(token, 4);
    await ack(token, all[1]!.cursor);
    const rest = await page(token);
    expect(rest.messages.map((m) => text(m.body))).toEqual(["m3", "m4"]);
    expect(rest.next).toBe(all[3]!.cursor);
    expect((await page(token, "?limit=1")).messages.map((m) => text(m.body))).toEqual(["m3"]);
  });

  it("an empty page's next is the given after, or null without one", async () => {
    const token = await addClient(betaHs, uniq("idle"));
    expect(await page(token)).toEqual({ messages: [], next: null });
    expect(await page(token, "?after=7")).toEqual({ messages: [], next: 7 });
  });
});

describe("long-poll", () => {
  it("a GET with wait=10 returns as soon as a fan-out for the client is committed", async () => {
    const id = uniq("poller");
    const token = await member(id);
    const started = Date.now();
    const waiting = page(token, "?wait=10");
    await new Promise((r) => setTimeout(r, 300));
    const event = await send([id], "wake up");
    const result = await waiting;
    const elapsed = Date.now() - started;
    expect(result.messages.map((m) => [m.event, text(m.body)])).toEqual([[event, "wake up"]]);
    expect(result.next).toBe(result.messages[0]!.cursor);
    expect(elapsed).toBeGreaterThanOrEqual(300);
    expect(elapsed).toBeLessThan(5000);
  });

  it("a waiting GET is not ended by a message for another client, and returns empty when wait passes", async () => {
    const [a, b] = [uniq("patient"), uniq("other")];
    const tokenA = await member(a);
    const tokenB = await member(b);
    const started = Date.now();
    const waiting = page(tokenA, "?wait=2");
    await new Promise((r) => setTimeout(r, 200));
    await send([b], "not for a");
    await waitForMessages(tokenB, 1);
    expect(await waiting).toEqual({ messages: [], next: null });
    const elapsed = Date.now() - started;
    expect(elapsed).toBeGreaterThanOrEqual(1900);
    expect(elapsed).toBeLessThan(5000);
  });
});

describe("fan-out", () => {
  it("a fan-out retried twice with the same id stores the message once for the recipient", async () => {
    const id = uniq("retried");
    const token = await member(id);
    const request = { id: `req-${id}`, group: GROUP, body: b64("only once"), recipients: [recipient(id)] };
    for (let attempt = 0; attempt < 3; attempt++) {
      const res = await fanout(request);
      expect(res.status).toBe(200);
      expect(res.json).toMatchObject({ id: request.id, events: [{ server: "beta", event: request.id, recipients: 1, published: true }] });
    }
    // A later message marks the point by which every retry has been processed.
    const marker = await send([id], "marker");
    const messages = await eventually(async () => {
      const m = (await page(token)).messages;
      return m.some((x) => x.event === marker) && m;
    });
    expect(messages.map((m) => [m.event, text(m.body)])).toEqual([[request.id, "only once"], [marker, "marker"]]);
    expect(await deliveriesFor(id)).toBe(2);
  });

  it("returns one event per destination and drops repeated recipients", async () => {
    const id = uniq("dup");
    const token = await member(id);
    const res = await fanout({
      group: "chat@alpha", body: b64("hi"),
      recipients: [recipient(id), recipient(id), { server: "gamma", client: "gail" }],
    });
    expect(res.status).toBe(200);
    const events = res.json.events as { server: string; recipients: number; published: boolean }[];
    expect(events.map((e) => [e.server, e.recipients, e.published])).toEqual([["beta", 1, true], ["gamma", 1, true]]);
    expect((await waitForMessages(token, 1)).map((m) => text(m.body))).toEqual(["hi"]);
  });
});

describe("keys and operations", () => {
  it("GET /.well-known/fedrelay/jwks.json serves the homeserver's public key without its private part", async () => {
    const res = await call(`${betaHs.relay.url}/.well-known/fedrelay/jwks.json`);
    expect(res.status).toBe(200);
    expect(res.contentType).toMatch(/^application\/json/);
    const jwks = JSON.parse(res.body) as { keys: Record<string, unknown>[] };
    expect(jwks.keys).toHaveLength(1);
    const [key] = jwks.keys;
    expect(key).toMatchObject({ kty: "OKP", crv: "Ed25519", kid: "beta#k1", x: beta.jwk.x });
    expect(key).not.toHaveProperty("d");
    expect(key).toEqual(beta.publicJwk);
    expect(JSON.stringify(jwks)).not.toContain(beta.jwk.d);
  });

  it("/healthz is 200 and /readyz is 200 with postgres, nats and worker checks", async () => {
    expect(await http(`${betaHs.relay.url}/healthz`)).toEqual({ status: 200, json: { ok: true } });
    // On the public listener (no http.operator here), readiness is for holders of the service token.
    expect(await http(`${betaHs.relay.url}/readyz`, { token: SERVICE_TOKEN })).toEqual({ status: 200, json: { ok: true, checks: { postgres: true, nats: true, worker: true, streams: true } } });
    // An API-only process has no worker to report on.
    expect(await http(`${gammaHs.relay.url}/readyz`, { token: SERVICE_TOKEN })).toEqual({ status: 200, json: { ok: true, checks: { postgres: true, nats: true, streams: true } } });
  });

  it("/metrics exposes the relay's counters and the default process metrics", async () => {
    const id = uniq("counted");
    const token = await member(id);
    await send([id], "count me");
    await waitForMessages(token, 1);
    const res = await call(`${betaHs.relay.url}/metrics`, { headers: { authorization: `Bearer ${SERVICE_TOKEN}` } });
    expect(res.status).toBe(200);
    expect(res.contentType).toMatch(/^text\/plain/);
    const value = (name: string): number => metricValue(res.body, name);
    expect(value("fedrelay_events_received_total")).toBeGreaterThanOrEqual(1);
    expect(value("fedrelay_deliveries_committed_total")).toBeGreaterThanOrEqual(1);
    expect(res.body).toMatch(/^process_cpu_user_seconds_total \S+$/m);
    expect(res.body).toMatch(/^nodejs_heap_size_used_bytes \S+$/m);
  });
});
