/** What the homeserver's own backend and operators do (service token): fan-out, clients, capabilities, policy. */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { RelayError } from "../errors.ts";
import { fanoutRequestSchema } from "../fanout.ts";
import { issueCapabilityFor, listCapabilitiesOf, revokeCapabilityFor } from "../operations/capabilities.ts";
import { evidenceOf } from "../operations/evidence.ts";
import type { Operation } from "../operations/operation.ts";
import { putRateLimit, removeRateLimit, showRateLimits } from "../operations/rate-limits.ts";
import { putServerRule, removeServerRule, setPolicyMode, showPolicy } from "../operations/server-policy.ts";
import { isClientId } from "../protocol/names.ts";
import { reportsFor, type StoredReport } from "../reports.ts";
import { registerClient, removeClient, revokeClientTokens } from "../store/clients.ts";
import { capabilityRequest } from "./client-routes.ts";
import { longPoll, parse, type ApiDeps } from "./common.ts";

const fanoutQuery = z.strictObject({ wait: z.string().regex(/^\d{1,3}$/, "must be whole seconds").transform(Number).optional() });
// Shapes only: the values are checked by the operations (src/operations/), as for the CLI.
const ruleBody = z.strictObject({ action: z.string() });
const modeBody = z.strictObject({ mode: z.string() });
const limitBody = z.strictObject({ rate: z.number(), burst: z.number() });

function clientParam(raw: string): string {
  const id = raw; // fastify has already decoded the path parameter once
  if (!isClientId(id)) throw new RelayError("bad_request", `"${id}" is not a client id`);
  return id;
}

/** Runs a change to the policy or the limits, then reloads them: this process applies it at once, every other within a second. */
async function change<T>(api: ApiDeps, operation: Operation<T>): Promise<T> {
  const result = await operation(api.db);
  await api.policy.refresh();
  return result;
}

/** Every route here needs the service token (src/http/access.ts). */
const backend = { config: { access: "backend" } } as const;

export function registerBackendRoutes(app: FastifyInstance, api: ApiDeps): void {
  app.post("/v1/fanout", { ...backend, bodyLimit: api.fanoutBodyLimit }, async (request, reply) => {
    const { wait = 0 } = parse(fanoutQuery, request.query, "query");
    const body = parse(fanoutRequestSchema, request.body, "fan-out request");
    const result = await api.fanout.fanout(body);
    const published = result.events.filter((e) => e.published);
    const failed = result.events.length - published.length;
    let reports: StoredReport[] | undefined;
    if (wait > 0) {
      // Until every published event has its destination's report, or the wait ends.
      const refs = [...new Set(published.map((e) => e.event))];
      const complete = (list: StoredReport[]): boolean =>
        published.every((e) => list.some((r) => r.event === e.event && r.server === e.server));
      reports = await longPoll(api, undefined, refs.map((ref) => `report:${ref}`), Math.min(wait, api.maxWaitSeconds), async () => {
        const list = await reportsFor(api.db, refs);
        return complete(list) ? list : undefined;
      }, request.signal) ?? await reportsFor(api.db, refs);
    }
    const payload = { ...result, ...(reports ? { reports } : {}) };
    // 503 when a destination was not reached: the caller retries with the same id, which is safe.
    if (failed > 0) {
      return reply.status(503).send({ error: "publish_failed", message: `${failed} of ${result.events.length} events were not published`, ...payload });
    }
    return payload;
  });

  app.put<{ Params: { id: string } }>("/v1/clients/:id", backend, async (request, reply) => {
    const id = clientParam(request.params.id);
    const created = await registerClient(api.db, id);
    return reply.status(created ? 201 : 200).send({ client: id, created });
  });

  app.delete<{ Params: { id: string } }>("/v1/clients/:id", backend, async (request, reply) => {
    const id = clientParam(request.params.id);
    if (!(await removeClient(api.db, id))) throw new RelayError("not_found", `no client ${id}`);
    return reply.status(204).send();
  });

  app.post<{ Params: { id: string } }>("/v1/clients/:id/tokens", backend, async (request, reply) => {
    const id = clientParam(request.params.id);
    const { token, expiresAt } = await api.clientTokens.mint(id);
    return reply.status(201).send({ client: id, token, expires_at: expiresAt });
  });
  // Every token issued to the client so far stops working (a lost device, a logout everywhere).
  app.delete<{ Params: { id: string } }>("/v1/clients/:id/tokens", backend, async (request, reply) => {
    const id = clientParam(request.params.id);
    if (!(await revokeClientTokens(api.db, id))) throw new RelayError("not_found", `no client ${id}`);
    return reply.status(204).send();
  });

  // The backend issues and revokes on a client's behalf, e.g. when it processes a join or a kick.
  app.post<{ Params: { id: string } }>("/v1/clients/:id/capabilities", backend, async (request, reply) => {
    const { group } = parse(capabilityRequest, request.body, "capability request");
    return reply.status(201).send(await issueCapabilityFor(request.params.id, group)(api.db));
  });
  app.get<{ Params: { id: string } }>("/v1/clients/:id/capabilities", backend, async (request) => listCapabilitiesOf(request.params.id)(api.db));
  app.delete<{ Params: { id: string; cap: string } }>("/v1/clients/:id/capabilities/:cap", backend, async (request, reply) => {
    await revokeCapabilityFor(request.params.cap, request.params.id)(api.db);
    return reply.status(204).send();
  });

  // What `fedrelay evidence` prints, for an operator's tools: the same operation.
  app.get<{ Params: { jti: string }; Querystring: { from?: string } }>("/v1/admin/evidence/:jti", backend, async (request) =>
    evidenceOf(request.params.jti, typeof request.query.from === "string" ? request.query.from : undefined)(api.db, api.self));

  app.get("/v1/admin/policy", backend, async () => showPolicy(() => api.policy.current())(api.db));
  app.put<{ Params: { pattern: string } }>("/v1/admin/policy/rules/:pattern", backend, async (request) =>
    change(api, putServerRule(request.params.pattern, parse(ruleBody, request.body, "rule").action)));
  app.delete<{ Params: { pattern: string } }>("/v1/admin/policy/rules/:pattern", backend, async (request, reply) => {
    await change(api, removeServerRule(request.params.pattern));
    return reply.status(204).send();
  });
  app.put("/v1/admin/policy/mode", backend, async (request) => change(api, setPolicyMode(parse(modeBody, request.body, "policy mode").mode)));

  app.get("/v1/admin/rate-limits", backend, async () => showRateLimits(() => api.policy.rates())(api.db));
  for (const [scope, path] of [["server", "servers"], ["client", "clients"]] as const) {
    app.put<{ Params: { subject: string } }>(`/v1/admin/rate-limits/${path}/:subject`, backend, async (request) =>
      change(api, putRateLimit(scope, request.params.subject, parse(limitBody, request.body, "rate limit"))));
    app.delete<{ Params: { subject: string } }>(`/v1/admin/rate-limits/${path}/:subject`, backend, async (request, reply) => {
      await change(api, removeRateLimit(scope, request.params.subject));
      return reply.status(204).send();
    });
  }
}
