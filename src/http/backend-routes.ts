/** What the homeserver's own backend and operators do (service token): fan-out, clients, capabilities, policy. */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { RelayError } from "../errors.ts";
import { fanoutRequestSchema } from "../fanout.ts";
import { isServerPattern } from "../policy/server-rules.ts";
import { MAX_RECIPIENTS } from "../protocol/claims.ts";
import { isClientId, isHomeserverName, parseGroupId } from "../protocol/names.ts";
import { reportsFor, type StoredReport } from "../reports.ts";
import { clientExists, registerClient, removeClient, revokeClientTokens } from "../store/clients.ts";
import { issueCapability, listCapabilities, revokeCapability } from "../store/capabilities.ts";
import { deleteRateOverride, deleteRule, loadRateOverrides, loadRuntimePolicy, putRateOverride, putRule, setMode } from "../store/server-policy.ts";
import { capabilityRequest } from "./client-routes.ts";
import { longPoll, parse, type ApiDeps } from "./common.ts";

const fanoutQuery = z.strictObject({ wait: z.string().regex(/^\d{1,3}$/, "must be whole seconds").transform(Number).optional() });
const ruleBody = z.strictObject({ action: z.enum(["allow", "deny"]) });
const modeBody = z.strictObject({ mode: z.enum(["open", "allowlist"]) });
const limitBody = z.strictObject({ rate: z.number().min(0), burst: z.number().min(1) });

function clientParam(raw: string): string {
  const id = raw; // fastify has already decoded the path parameter once
  if (!isClientId(id)) throw new RelayError("bad_request", `"${id}" is not a client id`);
  return id;
}

async function existingClient(api: ApiDeps, raw: string): Promise<string> {
  const id = clientParam(raw);
  if (!(await clientExists(api.db, id))) throw new RelayError("not_found", `no client ${id}`);
  return id;
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
    const id = await existingClient(api, request.params.id);
    const { group } = parse(capabilityRequest, request.body, "capability request");
    return reply.status(201).send(await issueCapability(api.db, id, group, parseGroupId(group)!.owner));
  });
  app.get<{ Params: { id: string } }>("/v1/clients/:id/capabilities", backend, async (request) =>
    ({ capabilities: await listCapabilities(api.db, await existingClient(api, request.params.id)) }));
  app.delete<{ Params: { id: string; cap: string } }>("/v1/clients/:id/capabilities/:cap", backend, async (request, reply) => {
    const id = await existingClient(api, request.params.id);
    if (!(await revokeCapability(api.db, request.params.cap, id))) throw new RelayError("not_found", `no capability ${request.params.cap}`);
    return reply.status(204).send();
  });

  app.get("/v1/admin/policy", backend, async () => {
    const current = api.policy.current();
    return { ...current, runtime: await loadRuntimePolicy(api.db) };
  });
  app.put<{ Params: { pattern: string } }>("/v1/admin/policy/rules/:pattern", backend, async (request) => {
    const pattern = request.params.pattern;
    if (!isServerPattern(pattern)) throw new RelayError("bad_request", `"${pattern}" is not a homeserver name or *.suffix pattern`);
    const { action } = parse(ruleBody, request.body, "rule");
    await putRule(api.db, pattern, action);
    await api.policy.refresh();
    return { pattern, action };
  });
  app.delete<{ Params: { pattern: string } }>("/v1/admin/policy/rules/:pattern", backend, async (request, reply) => {
    const pattern = request.params.pattern;
    if (!(await deleteRule(api.db, pattern))) throw new RelayError("not_found", `no run-time rule ${pattern}`);
    await api.policy.refresh();
    return reply.status(204).send();
  });
  app.get("/v1/admin/rate-limits", backend, async () => {
    const rates = api.policy.rates();
    return { ...rates, runtime: await loadRateOverrides(api.db) };
  });
  for (const [scope, path] of [["server", "servers"], ["client", "clients"]] as const) {
    app.put<{ Params: { subject: string } }>(`/v1/admin/rate-limits/${path}/:subject`, backend, async (request) => {
      const subject = request.params.subject;
      if (scope === "server" ? !isHomeserverName(subject) : !isClientId(subject)) {
        throw new RelayError("bad_request", `"${subject}" is not a ${scope === "server" ? "homeserver name" : "client id"}`);
      }
      const limit = parse(limitBody, request.body, "rate limit");
      // A sender's bucket must hold a whole event (DESIGN §5: up to 1,000 recipients).
      if (scope === "server" && limit.burst < MAX_RECIPIENTS) throw new RelayError("bad_request", `rate limit burst: must be at least ${MAX_RECIPIENTS} for a homeserver`);
      await putRateOverride(api.db, scope, subject, limit);
      await api.policy.refresh();
      return { [scope]: subject, ...limit };
    });
    app.delete<{ Params: { subject: string } }>(`/v1/admin/rate-limits/${path}/:subject`, backend, async (request, reply) => {
      if (!(await deleteRateOverride(api.db, scope, request.params.subject))) throw new RelayError("not_found", `no run-time limit for ${request.params.subject}`);
      await api.policy.refresh();
      return reply.status(204).send();
    });
  }

  app.put("/v1/admin/policy/mode", backend, async (request) => {
    const { mode } = parse(modeBody, request.body, "policy mode");
    await setMode(api.db, mode);
    await api.policy.refresh();
    return { mode };
  });
}
