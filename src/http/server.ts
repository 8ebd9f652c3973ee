/**
 * The HTTP surface (docs/protocol.md §9–10). A process with the API role serves
 * peers, clients and its backend on the public listener; every process serves
 * operators (/metrics, /readyz) on the operator listener, which is the public
 * one unless http.operator gives it an address of its own. Every route declares
 * who may call it (src/http/access.ts). Every error is `{ error: <code>, message }`
 * with the code's status.
 */
import { STATUS_CODES, type IncomingMessage } from "node:http";
import type { Socket } from "node:net";
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from "fastify";
import type { Logger } from "pino";
import { isRelayError, RelayError } from "../errors.ts";
import type { RelayMetrics } from "../metrics.ts";
import { enforceAccess, type RouteAccess } from "./access.ts";
import { bearerOf } from "./auth.ts";
import { registerBackendRoutes } from "./backend-routes.ts";
import { registerClientRoutes } from "./client-routes.ts";
import { sourceOf, WaitSlots } from "./limits.ts";
import type { ApiDeps } from "./common.ts";

export interface HealthReport {
  readonly ok: boolean;
  readonly checks: Readonly<Record<string, boolean>>;
  /** What is wrong, in words, when a check says so (a stream changed and not repaired). */
  readonly problems?: readonly string[];
}

/** What a connection may cost before it has sent a whole request. */
export interface ConnectionLimits {
  /** From a connection's first byte (or its previous request) to the end of the request's headers. */
  readonly headersTimeoutMs: number;
  /** To the end of the request's body: a slow sender is answered 408 and disconnected. */
  readonly requestTimeoutMs: number;
  /** Open connections per listener; more are closed as they arrive. */
  readonly maxConnections: number;
  /** Of those, from one source address (an IPv6 /64). */
  readonly maxConnectionsPerSource: number;
  /** How long an idle keep-alive connection stays open. */
  readonly keepAliveTimeoutMs: number;
}

export interface HttpDeps {
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  readonly health: () => Promise<HealthReport>;
  /** True once shutdown has begun: responses then close their connections. */
  readonly isClosing?: () => boolean;
  readonly api?: ApiDeps;
  readonly limits: ConnectionLimits;
}

export interface Address {
  readonly host: string;
  readonly port: number;
}

/**
 * Bodies of every route but fan-out are tens of bytes (`{through}`, `{group}`,
 * `{action}`): 4 KiB leaves room, and is all an unmatched route could ever make
 * the process hold.
 */
export const SMALL_BODY_LIMIT = 4096;
/**
 * Path parameters are client ids (255 characters), group ids (382) and patterns;
 * percent-encoded throughout they triple: 1,146. The router's default of 100
 * answered valid client ids with 414.
 */
export const MAX_PARAM_LENGTH = 1200;

/** How long a connection whose body went unread stays open: long enough for its caller to read the answer. */
export const LINGER_MS = 1000;

/**
 * A request answered before its body was read (refused, too large, no route).
 * Reading the rest, even to discard it, costs CPU and memory for every byte the
 * caller chooses to send (measured: eight 16 MiB bodies read and dropped, +30 MB
 * resident); closing at once makes the kernel reset the connection over the
 * unread bytes, and a caller still sending loses the answer. So the answer says
 * `Connection: close`, the connection stops reading (the caller's sends stall on
 * a full window while it reads the answer), and it is closed LINGER_MS later.
 */
function lingerUnread(request: IncomingMessage, reply: FastifyReply): void {
  // A small body costs nothing to read and drop: Node does, and the connection stays usable
  // (requests pipelined behind it are answered).
  const length = Number(request.headers["content-length"]);
  if (Number.isFinite(length) && length <= SMALL_BODY_LIMIT) return;
  reply.header("connection", "close");
  const socket = request.socket as Socket & { destroySoon?: () => void };
  // Node ends a `Connection: close` response with socket.destroySoon(): a reset, right after the answer.
  socket.destroySoon = () => {
    stopReading(socket);
    socket.end();
    const timer = setTimeout(() => socket.destroy(), LINGER_MS);
    socket.once("close", () => clearTimeout(timer));
  };
}

/**
 * The HTTP parser reads the socket's handle directly, so `socket.pause()` does
 * not stop it (measured: all 16 MiB of a refused body were read either way);
 * `readStop()` on the handle does (64 KiB, what one read had taken), and Node
 * does not start it again: the handle still counts as reading.
 */
function stopReading(socket: Socket): void {
  const handle = (socket as unknown as { _handle?: { readStop?: () => unknown } })._handle;
  if (typeof handle?.readStop === "function") handle.readStop();
  else socket.pause();
}

function sendError(reply: FastifyReply, err: RelayError): FastifyReply {
  if (err.retryAfterSeconds !== undefined) reply.header("retry-after", String(err.retryAfterSeconds));
  return reply.status(err.httpStatus).send({ error: err.code, message: err.message });
}

export type ListenerRole =
  /** The API's listener, also serving operators (who then need the service token). */
  | "public+operator"
  | "public"
  | "operator";

/** One listener's app: its routes registered and declared, not yet listening. */
export function createHttpApp(deps: HttpDeps, role: ListenerRole): { app: FastifyInstance; routes: readonly RouteAccess[] } {
  const { limits, api } = deps;
  if (role !== "operator" && !api) throw new TypeError(`a ${role} listener needs the API`);
  const app = Fastify({
    loggerInstance: deps.log as FastifyBaseLogger,
    // Per-request logs would dominate under long-polling clients; errors are still logged.
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: SMALL_BODY_LIMIT,
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    // What the router refuses before any route or hook runs (a malformed percent-encoding, a
    // parameter over MAX_PARAM_LENGTH) answers in the API's error format, its body unread.
    frameworkErrors: (err, request, reply) => {
      if (!request.raw.complete) lingerUnread(request.raw, reply);
      return sendError(reply, err.code === "FST_ERR_MAX_PARAM_LENGTH"
        ? new RelayError("uri_too_long", `a path parameter is longer than ${MAX_PARAM_LENGTH} characters`)
        : new RelayError("bad_request", err.message));
    },
    requestTimeout: limits.requestTimeoutMs,
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    // What Node refuses before any route (headers too large, a timeout, a malformed request
    // line) answers in the API's error format too, and closes the connection.
    clientErrorHandler: (err, socket) => {
      const code = (err as { code?: string }).code;
      const error = code === "HPE_HEADER_OVERFLOW" ? new RelayError("headers_too_large", "request headers too large")
        : code === "ERR_HTTP_REQUEST_TIMEOUT" ? new RelayError("request_timeout", "the request did not arrive in time")
        : new RelayError("bad_request", "malformed HTTP request");
      if (!socket.writable) return void socket.destroy();
      const body = JSON.stringify({ error: error.code, message: error.message });
      socket.end(`HTTP/1.1 ${error.httpStatus} ${STATUS_CODES[error.httpStatus]}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    },
    http: {
      headersTimeout: limits.headersTimeoutMs,
      // Node looks for connections past their timeouts this often (by default every 30 s,
      // which let a slow body live up to 30 s longer than its timeout).
      connectionsCheckingInterval: Math.max(50, Math.min(1000, Math.floor(limits.headersTimeoutMs / 2))),
    },
  });
  app.server.maxConnections = limits.maxConnections;
  // One source may hold at most its share of the listener's connections; beyond it, new ones are closed.
  const connections = new WaitSlots({ perHolder: limits.maxConnectionsPerSource, perProcess: limits.maxConnections });
  app.server.on("connection", (socket: Socket) => {
    const slot = connections.acquire(sourceOf(socket.remoteAddress ?? ""));
    if (!slot.ok) return void socket.destroy();
    socket.once("close", slot.release);
  });
  // Node answers `Expect: 100-continue` itself, inviting the body before anyone is authenticated:
  // the request goes through the hooks first, and is told to continue once its caller passed.
  app.server.on("checkContinue", (req, res) => app.server.emit("request", req, res));

  const routes = enforceAccess(app, {
    operatorNeedsCredential: role === "public+operator",
    auth: api && {
      service: (request) => api.serviceAuth.check(request.headers.authorization, sourceOf(request.ip)),
      client: (request) => api.clientTokens.verify(bearerOf(request.headers.authorization)),
    },
    onRefused: (access, err) => deps.metrics.httpRefused.inc({ access, code: isRelayError(err) ? err.code : "internal" }),
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
  app.addHook("onSend", async (request, reply) => {
    if (deps.isClosing?.()) reply.header("connection", "close");
    else if (!request.raw.complete) lingerUnread(request.raw, reply);
  });
  app.setNotFoundHandler((request, reply) =>
    sendError(reply, new RelayError("not_found", `no route ${request.method} ${request.url.split("?")[0]}`)));

  app.get("/healthz", { config: { access: "public" } }, async () => ({ ok: true }));
  if (role !== "public") {
    app.get("/readyz", { config: { access: "operator" } }, async (_req, reply) => {
      const report = await deps.health();
      return reply.status(report.ok ? 200 : 503).send(report);
    });
    app.get("/metrics", { config: { access: "operator" } }, async (_req, reply) =>
      reply.header("content-type", deps.metrics.registry.contentType).send(await deps.metrics.registry.metrics()));
  }
  if (api && role !== "operator") {
    app.get("/.well-known/fedrelay/jwks.json", { config: { access: "public" } }, async (_req, reply) =>
      reply.header("cache-control", "public, max-age=300").send(api.jwks()));
    registerBackendRoutes(app, api);
    registerClientRoutes(app, api);
  }
  return { app, routes };
}

export interface HttpServers {
  /** Every route of every listener, with who may call it. */
  readonly routes: readonly (RouteAccess & { readonly listener: "public" | "operator" })[];
  /** `url` is the API's listener (the operator one in a process without the API); `operatorUrl` serves /metrics and /readyz. */
  listen(): Promise<{ url: string; operatorUrl: string }>;
  close(): Promise<void>;
}

/**
 * The process's listeners: with the API, the public one (also serving operators
 * unless `addresses.operator` is given); without it, the operator one alone.
 */
export function createHttpServers(deps: HttpDeps, addresses: { public?: Address; operator?: Address }): HttpServers {
  const separate = !deps.api || addresses.operator !== undefined;
  const listeners: { name: "public" | "operator"; address: Address; app: FastifyInstance; routes: readonly RouteAccess[] }[] = [];
  if (deps.api) {
    if (!addresses.public) throw new TypeError("the API needs a public address");
    listeners.push({ name: "public", address: addresses.public, ...createHttpApp(deps, separate ? "public" : "public+operator") });
  }
  if (separate) {
    const address = addresses.operator ?? addresses.public;
    if (!address) throw new TypeError("the operator listener needs an address");
    listeners.push({ name: "operator", address, ...createHttpApp(deps, "operator") });
  }
  return {
    routes: listeners.flatMap((l) => l.routes.map((r) => ({ ...r, listener: l.name }))),
    async listen() {
      const urls = new Map<string, string>();
      for (const l of listeners) urls.set(l.name, await l.app.listen({ host: l.address.host, port: l.address.port }));
      const url = urls.get("public") ?? urls.get("operator")!;
      return { url, operatorUrl: urls.get("operator") ?? url };
    },
    async close() {
      await Promise.all(listeners.map((l) => l.app.close()));
    },
  };
}
