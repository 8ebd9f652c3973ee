/**
 * The HTTP surface (DESIGN §9). Every process serves /metrics, /healthz and
 * /readyz; a process with the API role also serves keys, fan-out and clients.
 * Every error is `{ error: <code>, message }` with the code's status.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import { HTTP_STATUS, isRelayError, RelayError } from "../errors.ts";
import type { FanoutRequest, FanoutResult } from "../fanout.ts";
import { fanoutRequestSchema } from "../fanout.ts";
import type { RelayMetrics } from "../metrics.ts";
import { isClientId } from "../protocol/names.ts";
import type { Db } from "../store/db.ts";
import { clientExists, registerClient } from "../store/clients.ts";
import { ackThrough, listMessages, type StoredMessage } from "../store/messages.ts";
import type { DeliveryNotifier } from "../store/notifier.ts";
import { checkServiceToken, type ClientTokens } from "./auth.ts";

export interface HealthReport {
  readonly ok: boolean;
  readonly checks: Readonly<Record<string, boolean>>;
}

export interface ApiDeps {
  readonly db: Db;
  readonly notifier: DeliveryNotifier;
  readonly fanout: { fanout(request: FanoutRequest): Promise<FanoutResult> };
  readonly clientTokens: ClientTokens;
  readonly jwks: () => { keys: readonly object[] };
  readonly serviceToken: string | undefined;
  readonly maxWaitSeconds: number;
  /** Request bodies: a fan-out carries one body plus its recipient list. */
  readonly bodyLimit: number;
}

export interface HttpDeps {
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  readonly health: () => Promise<HealthReport>;
  readonly api?: ApiDeps;
}

const cursor = z.string().regex(/^\d{1,15}$/, "must be a non-negative integer").transform(Number);
const messagesQuery = z.strictObject({
  after: cursor.optional(),
  limit: z.string().regex(/^\d{1,4}$/, "must be 1–1000").transform(Number).pipe(z.number().min(1).max(1000)).optional(),
  wait: z.string().regex(/^\d{1,3}$/, "must be whole seconds").transform(Number).optional(),
});
const ackBody = z.strictObject({ through: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER) });

function parse<T>(schema: z.ZodType<T>, value: unknown, what: string): T {
  const result = schema.safeParse(value);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const path = issue.path.join(".");
    throw new RelayError("bad_request", `${what}${path ? ` ${path}` : ""}: ${issue.message}`);
  }
  return result.data;
}

function decodePayload(token: string): Record<string, unknown> {
  return JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString("utf8")) as Record<string, unknown>;
}

export function messageView(m: StoredMessage): Record<string, unknown> {
  const claims = decodePayload(m.token);
  return {
    cursor: m.cursor,
    from: m.iss,
    group: m.grp,
    event: m.jti,
    body: claims.body,
    ...(claims.ctype === undefined ? {} : { ctype: claims.ctype }),
    ...(claims.seq === undefined ? {} : { seq: claims.seq }),
    sent_at: claims.iat,
    received_at: m.receivedAt.toISOString(),
  };
}

function sendError(reply: FastifyReply, err: RelayError): FastifyReply {
  return reply.status(err.httpStatus).send({ error: err.code, message: err.message });
}

export async function createHttpServer(deps: HttpDeps): Promise<FastifyInstance> {
  const app = Fastify({ loggerInstance: deps.log as FastifyBaseLogger, bodyLimit: deps.api?.bodyLimit ?? 1024 * 1024, 
    // Per-request logs would dominate under long-polling clients; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
  });

  app.setErrorHandler((err, request, reply) => {
    if (isRelayError(err)) return sendError(reply, err);
    const e = err as { statusCode?: number; code?: string; message: string };
    if (e.code === "FST_ERR_CTP_BODY_TOO_LARGE") return sendError(reply, new RelayError("payload_too_large", e.message));
    if (typeof e.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500) {
      return sendError(reply, new RelayError("bad_request", e.message));
    }
    request.log.error({ err }, "request failed");
    const unavailable = new RelayError("internal", "internal error");
    return reply.status(HTTP_STATUS.internal).send({ error: unavailable.code, message: unavailable.message });
  });
  app.setNotFoundHandler((request, reply) =>
    sendError(reply, new RelayError("not_found", `no route ${request.method} ${request.url.split("?")[0]}`)));

  app.get("/healthz", async () => ({ ok: true }));
  app.get("/readyz", async (_req, reply) => {
    const report = await deps.health();
    return reply.status(report.ok ? 200 : 503).send(report);
  });
  app.get("/metrics", async (_req, reply) =>
    reply.header("content-type", deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics()));

  const api = deps.api;
  if (api) registerApi(app, api);
  return app;
}

function registerApi(app: FastifyInstance, api: ApiDeps): void {
  const service = async (request: { headers: { authorization?: string | undefined } }): Promise<void> =>
    checkServiceToken(request.headers.authorization, api.serviceToken);
  const client = async (request: { headers: { authorization?: string | undefined } }): Promise<string> => {
    const id = await api.clientTokens.verify(request.headers.authorization);
    if (!(await clientExists(api.db, id))) throw new RelayError("unauthorized", `client ${id} no longer exists`);
    return id;
  };

  app.get("/.well-known/fedrelay/jwks.json", async (_req, reply) =>
    reply.header("cache-control", "public, max-age=300").send(api.jwks()));

  app.post("/v1/fanout", async (request, reply) => {
    await service(request);
    const body = parse(fanoutRequestSchema, request.body, "fan-out request");
    const result = await api.fanout.fanout(body);
    const failed = result.events.filter((e) => !e.published);
    // 503 when any destination was not reached: the caller retries with the same id, which is safe.
    return reply.status(failed.length === 0 ? 200 : 503).send(
      failed.length === 0 ? result : { error: "publish_failed", message: `${failed.length} of ${result.events.length} events were not published`, ...result },
    );
  });

  app.put<{ Params: { id: string } }>("/v1/clients/:id", async (request, reply) => {
    await service(request);
    const id = decodeURIComponent(request.params.id);
    if (!isClientId(id)) throw new RelayError("bad_request", `"${id}" is not a client id`);
    const created = await registerClient(api.db, id);
    return reply.status(created ? 201 : 200).send({ client: id, created });
  });

  app.post<{ Params: { id: string } }>("/v1/clients/:id/tokens", async (request, reply) => {
    await service(request);
    const id = decodeURIComponent(request.params.id);
    if (!isClientId(id) || !(await clientExists(api.db, id))) throw new RelayError("not_found", `no client ${id}`);
    const { token, expiresAt } = await api.clientTokens.mint(id);
    return reply.status(201).send({ client: id, token, expires_at: expiresAt });
  });

  app.get("/v1/messages", async (request) => {
    const clientId = await client(request);
    const q = parse(messagesQuery, request.query, "query");
    const limit = q.limit ?? 100;
    const wait = Math.min(q.wait ?? 0, api.maxWaitSeconds);
    let messages = await listMessages(api.db, clientId, q.after, limit);
    if (messages.length === 0 && wait > 0) {
      const deadline = Date.now() + wait * 1000;
      while (messages.length === 0 && Date.now() < deadline) {
        // Register before querying, so a commit between the two still wakes us.
        const w = api.notifier.waiter(clientId, deadline - Date.now());
        messages = await listMessages(api.db, clientId, q.after, limit);
        if (messages.length > 0) w.cancel();
        else await w.promise;
      }
      if (messages.length === 0) messages = await listMessages(api.db, clientId, q.after, limit);
    }
    return { messages: messages.map(messageView), next: messages.at(-1)?.cursor ?? q.after ?? null };
  });

  app.post("/v1/messages/ack", async (request) => {
    const clientId = await client(request);
    const { through } = parse(ackBody, request.body, "ack");
    return ackThrough(api.db, clientId, through);
  });
}
