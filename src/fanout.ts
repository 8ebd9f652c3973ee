/**
 * The owner's side: one fan-out request becomes one signed event per
 * destination homeserver (chunks of at most 1,000 recipients), each published
 * to that destination's inbox subject for this sender.
 */
import type { JetStreamClient } from "@nats-io/jetstream";
import { z } from "zod";
import { RelayError } from "./errors.ts";
import type { RelayMetrics } from "./metrics.ts";
import { isCanonicalBase64url, decodedLength } from "./protocol/base64url.ts";
import { MAX_CAPABILITY_LENGTH, MAX_CTYPE_LENGTH, MAX_RECIPIENTS, type EventClaims } from "./protocol/claims.ts";
import { uuidv7 } from "./protocol/event-id.ts";
import type { SigningKey } from "./protocol/keys.ts";
import { isClientId, isEventId, isHomeserverName, parseGroupId } from "./protocol/names.ts";
import { signEvent } from "./protocol/sign.ts";
import { inboxSubject, outboxSubject } from "./protocol/subjects.ts";
import { publishEvent } from "./transport/publisher.ts";

/** Over 1,000 recipients at one destination, chunks get a `_N` suffix: the request id leaves room for it. */
const MAX_REQUEST_ID = 56;

export const fanoutRequestSchema = z.strictObject({
  /** Optional idempotency key: retrying a request with the same id never stores a message twice. */
  id: z.string().max(MAX_REQUEST_ID).refine(isEventId, "must be 1–56 characters of [A-Za-z0-9_-]").optional(),
  group: z.string().refine((g) => parseGroupId(g) !== undefined, "must be <local>@<owner>"),
  body: z.string().refine(isCanonicalBase64url, "must be base64url without padding"),
  ctype: z.string().min(1).max(MAX_CTYPE_LENGTH).optional(),
  seq: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).optional(),
  recipients: z
    .array(
      z.strictObject({
        server: z.string().refine(isHomeserverName, "must be a homeserver name"),
        client: z.string().refine(isClientId, "must be a client id"),
        capability: z.string().min(1).max(MAX_CAPABILITY_LENGTH).optional(),
      }),
    )
    .min(1)
    .max(100_000),
});
export type FanoutRequest = z.infer<typeof fanoutRequestSchema>;

export interface FanoutEvent {
  readonly server: string;
  readonly event: string;
  readonly recipients: number;
  readonly published: boolean;
  readonly duplicate?: boolean;
  /** Stored in this homeserver's outbox, from which it is delivered (fanout.outbox). */
  readonly outbox?: boolean;
  readonly error?: string;
}

export interface FanoutResult {
  readonly id: string;
  readonly events: readonly FanoutEvent[];
}

export interface FanoutDeps {
  readonly self: string;
  readonly js: JetStreamClient;
  /** The key that signs now (a rotation changes it without a restart). */
  readonly signingKey: () => SigningKey;
  readonly metrics: RelayMetrics;
  readonly now: () => number;
  readonly eventLifetimeSeconds: number;
  readonly maxBodyBytes: number;
  readonly publishTimeoutMs: number;
  /** Publish to this homeserver's outbox instead of the destinations' inboxes (fanout.outbox). */
  readonly outbox?: boolean;
}

/** Groups recipients by destination, in first-seen order, dropping repeats of the same client. */
export function splitByDestination(recipients: FanoutRequest["recipients"]): Map<string, EventClaims["rcpt"]> {
  const out = new Map<string, EventClaims["rcpt"]>();
  const seen = new Set<string>();
  for (const r of recipients) {
    const key = `${r.server}\u0000${r.client}`;
    if (seen.has(key)) continue;
    seen.add(key);
    const list = out.get(r.server) ?? [];
    list.push(r.capability === undefined ? { cid: r.client } : { cid: r.client, cap: r.capability });
    out.set(r.server, list);
  }
  return out;
}

export function createFanout(deps: FanoutDeps): { fanout(request: FanoutRequest): Promise<FanoutResult> } {
  return {
    async fanout(request) {
      const group = parseGroupId(request.group)!;
      if (group.owner !== deps.self) {
        throw new RelayError("not_group_owner", `group ${request.group} is owned by ${group.owner}, not by this homeserver (${deps.self})`);
      }
      if (decodedLength(request.body) > deps.maxBodyBytes) {
        throw new RelayError("payload_too_large", `body is ${decodedLength(request.body)} bytes, limit ${deps.maxBodyBytes}`);
      }
      const id = request.id ?? uuidv7();
      const iat = Math.floor(deps.now());
      const jobs: Promise<FanoutEvent>[] = [];
      for (const [server, rcpt] of splitByDestination(request.recipients)) {
        const chunks = Math.ceil(rcpt.length / MAX_RECIPIENTS);
        for (let i = 0; i < chunks; i++) {
          const jti = chunks === 1 ? id : `${id}_${i}`;
          const claims: EventClaims = {
            iss: deps.self,
            aud: server,
            jti,
            iat,
            exp: iat + deps.eventLifetimeSeconds,
            grp: request.group,
            rcpt: rcpt.slice(i * MAX_RECIPIENTS, (i + 1) * MAX_RECIPIENTS),
            body: request.body,
            ...(request.ctype === undefined ? {} : { ctype: request.ctype }),
            ...(request.seq === undefined ? {} : { seq: request.seq }),
          };
          jobs.push(publishOne(server, claims));
        }
      }
      return { id, events: await Promise.all(jobs) };
    },
  };

  async function publishOne(server: string, claims: EventClaims): Promise<FanoutEvent> {
    const token = await signEvent(claims, deps.signingKey());
    const base = { server, event: claims.jti, recipients: claims.rcpt.length };
    try {
      const subject = deps.outbox ? outboxSubject(server, deps.self) : inboxSubject(server, deps.self);
      const ack = await publishEvent(deps.js, subject, Buffer.from(token, "latin1"), deps.publishTimeoutMs);
      deps.metrics.eventsPublished.inc({ destination: server });
      return { ...base, published: true, duplicate: ack.duplicate, ...(deps.outbox ? { outbox: true } : {}) };
    } catch (err) {
      deps.metrics.publishFailures.inc({ destination: server });
      return { ...base, published: false, error: (err as Error).message };
    }
  }
}
