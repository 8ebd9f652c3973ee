/**
 * The HTTP surface (DESIGN §9). Every process serves /metrics, /healthz and
 * /readyz; a process with the API role also serves keys, fan-out and clients.
 * Every error is `{ error: <code>, message }` with the code's status.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from "fastify";
import type { Logger } from "pino";
import { isRelayError, RelayError } from "../errors.ts";
import type { RelayMetrics } from "../metrics.ts";
import { registerBackendRoutes } from "./backend-routes.ts";
import { registerClientRoutes } from "./client-routes.ts";
import type { ApiDeps } from "./common.ts";

export interface HealthReport {
  readonly ok: boolean;
  readonly checks: Readonly<Record<string, boolean>>;
}

export interface HttpDeps {
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  readonly health: () => Promise<HealthReport>;
  /** True once shutdown has begun: responses then close their connections. */
  readonly isClosing?: () => boolean;
  readonly api?: ApiDeps;
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
    return sendError(reply, new RelayError("internal", "internal error"));
  });
  app.addHook("onSend", async (_request, reply) => {
    if (deps.isClosing?.()) reply.header("connection", "close");
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
  if (api) {
    app.get("/.well-known/fedrelay/jwks.json", async (_req, reply) =>
      reply.header("cache-control", "public, max-age=300").send(api.jwks()));
    registerBackendRoutes(app, api);
    registerClientRoutes(app, api);
  }
  return app;
}

