/** What a client does with its own homeserver: messages, capabilities, blocks. Never another client's. */
import type { FastifyInstance } from "fastify";
import { z } from "zod";
import { RelayError } from "../errors.ts";
import { storedClaims } from "../protocol/claims.ts";
import { isHomeserverName, parseGroupId } from "../protocol/names.ts";
import { issueCapabilityFor, listCapabilitiesOf, revokeCapabilityFor } from "../operations/capabilities.ts";
import { deleteBlock, listBlocks, putBlock, type BlockKind } from "../store/capabilities.ts";
import { ackThrough, listMessages, type StoredMessage } from "../store/messages.ts";
import { longPoll, parse, type ApiDeps } from "./common.ts";

const cursor = z.string().regex(/^\d{1,15}$/, "must be a non-negative integer").transform(Number);
const messagesQuery = z.strictObject({
  after: cursor.optional(),
  limit: z.string().regex(/^\d{1,4}$/, "must be 1–1000").transform(Number).pipe(z.number().min(1).max(1000)).optional(),
  wait: z.string().regex(/^\d{1,3}$/, "must be whole seconds").transform(Number).optional(),
});
const ackBody = z.strictObject({ through: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER) });
/** The shape only: the group is checked by the operation (src/operations/capabilities.ts). */
export const capabilityRequest = z.strictObject({ group: z.string() });

export function messageView(m: StoredMessage): Record<string, unknown> {
  const claims = storedClaims(m.token);
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

function blockTarget(kind: BlockKind, raw: string): string {
  const target = raw; // fastify has already decoded the path parameter once
  const ok = kind === "server" ? isHomeserverName(target) : parseGroupId(target) !== undefined;
  if (!ok) throw new RelayError("bad_request", `"${target}" is not a ${kind === "server" ? "homeserver name" : "group id"}`);
  return target;
}

/** Every route here is the authenticated client's own (src/http/access.ts): `request.clientId`. */
const client = { config: { access: "client" } } as const;

export function registerClientRoutes(app: FastifyInstance, api: ApiDeps): void {
  app.get("/v1/messages", client, async (request) => {
    const { clientId } = request;
    const q = parse(messagesQuery, request.query, "query");
    const limit = q.limit ?? 100;
    const wait = Math.min(q.wait ?? 0, api.maxWaitSeconds);
    const messages = (await longPoll(api, clientId, [clientId], wait, async () => {
      const page = await listMessages(api.db, clientId, q.after, limit);
      return page.length > 0 ? page : undefined;
    }, request.signal)) ?? [];
    return { messages: messages.map(messageView), next: messages.at(-1)?.cursor ?? q.after ?? null };
  });

  app.post("/v1/messages/ack", client, async (request) => {
    const { through } = parse(ackBody, request.body, "ack");
    return ackThrough(api.db, request.clientId, through);
  });

  app.post("/v1/capabilities", client, async (request, reply) => {
    const { group } = parse(capabilityRequest, request.body, "capability request");
    return reply.status(201).send(await issueCapabilityFor(request.clientId, group)(api.db));
  });

  app.get("/v1/capabilities", client, async (request) => listCapabilitiesOf(request.clientId)(api.db));

  app.delete<{ Params: { id: string } }>("/v1/capabilities/:id", client, async (request, reply) => {
    await revokeCapabilityFor(request.params.id, request.clientId)(api.db);
    return reply.status(204).send();
  });

  app.get("/v1/blocks", client, async (request) => listBlocks(api.db, request.clientId));
  for (const [kind, path] of [["server", "servers"], ["group", "groups"]] as const) {
    app.get<{ Params: { target: string } }>(`/v1/blocks/${path}/:target`, client, async (request) => {
      const { clientId } = request;
      const target = blockTarget(kind, request.params.target);
      const blocks = await listBlocks(api.db, clientId);
      if (!(kind === "server" ? blocks.servers : blocks.groups).includes(target)) throw new RelayError("not_found", `${target} is not blocked`);
      return { [kind]: target, blocked: true };
    });
    app.put<{ Params: { target: string } }>(`/v1/blocks/${path}/:target`, client, async (request, reply) => {
      const target = blockTarget(kind, request.params.target);
      const created = await putBlock(api.db, request.clientId, kind, target);
      return reply.status(created ? 201 : 200).send({ [kind]: target, blocked: true });
    });
    app.delete<{ Params: { target: string } }>(`/v1/blocks/${path}/:target`, client, async (request, reply) => {
      const target = blockTarget(kind, request.params.target);
      if (!(await deleteBlock(api.db, request.clientId, kind, target))) throw new RelayError("not_found", `${target} is not blocked`);
      return reply.status(204).send();
    });
  }
}
