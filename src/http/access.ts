/**
 * Who may call a route (docs/protocol.md §9). Every route declares it in its own
 * definition, `{ config: { access } }`, and a route without one fails at
 * start-up. One onRequest hook enforces it from the route the router matched,
 * never from the URL's text (a percent-encoded, doubled-slash or mixed-case
 * path is the same route, so the same check, or no route at all), and before
 * the body is read: nobody unauthenticated makes the process buffer or parse.
 */
import type { FastifyInstance, FastifyRequest } from "fastify";
import { RelayError } from "../errors.ts";

/**
 * - `public`: anyone (peers fetching keys, liveness probes);
 * - `client`: a client of this homeserver, with its bearer token;
 * - `backend`: the homeserver's backend and its operators, with the service token;
 * - `operator`: metrics and readiness. On a listener of their own (http.operator)
 *   they are open to whoever reaches it; on the public listener they need the
 *   service token.
 */
export const ACCESS = ["public", "client", "backend", "operator"] as const;
export type Access = (typeof ACCESS)[number];

declare module "fastify" {
  interface FastifyContextConfig {
    access?: Access;
  }
  interface FastifyRequest {
    /** The authenticated client, on `client` routes. */
    clientId: string;
  }
}

export interface Authenticators {
  /** Throws `unauthorized` (or `too_many_requests` while the caller's source is throttled). */
  service(request: FastifyRequest): void;
  /** The calling client's id; throws `unauthorized`. */
  client(request: FastifyRequest): Promise<string>;
}

export interface RouteAccess {
  readonly method: string;
  readonly url: string;
  readonly access: Access;
}

function isAccess(value: unknown): value is Access {
  return (ACCESS as readonly unknown[]).includes(value);
}

/**
 * Installs the declaration check and the enforcing hook on `app`; returns the
 * list of routes it sees registered from then on, with their access.
 */
export function enforceAccess(app: FastifyInstance, options: {
  /** Whether `operator` routes on this listener need the service token (it is also the public listener). */
  readonly operatorNeedsCredential: boolean;
  /** The API's credentials; a listener without them can only serve `public` and open `operator` routes. */
  readonly auth: Authenticators | undefined;
  readonly onRefused?: (access: Access, err: unknown) => void;
}): readonly RouteAccess[] {
  const { operatorNeedsCredential, auth, onRefused } = options;
  const needsAuth = (access: Access): boolean => access === "client" || access === "backend" || (access === "operator" && operatorNeedsCredential);
  const routes: RouteAccess[] = [];
  app.decorateRequest("clientId", "");
  app.addHook("onRoute", (route) => {
    const access: unknown = route.config?.access;
    const methods = [route.method].flat().join(",");
    if (!isAccess(access)) throw new TypeError(`route ${methods} ${route.url} declares no access (config.access: ${ACCESS.join(" | ")})`);
    if (needsAuth(access) && !auth) throw new TypeError(`route ${methods} ${route.url} is for ${access} callers, but this listener has no credentials to check`);
    for (const method of [route.method].flat()) routes.push({ method, url: route.url!, access });
  });
  app.addHook("onRequest", async (request, reply) => {
    const access = request.routeOptions.config.access;
    // No route matched: answer before anything is read (no body is buffered for a 404).
    if (access === undefined) throw new RelayError("not_found", `no route ${request.method} ${request.url.split("?")[0]}`);
    if (needsAuth(access)) {
      try {
        if (access === "client") request.clientId = await auth!.client(request);
        else auth!.service(request);
      } catch (err) {
        onRefused?.(access, err);
        throw err;
      }
    }
    // The caller is known: now, and only now, may it send the body it asked leave to send.
    if (/^100-continue$/i.test(request.headers.expect ?? "")) reply.raw.writeContinue();
  });
  return routes;
}
