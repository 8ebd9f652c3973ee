/**
 * The sender's outbox (fanout.outbox): `POST /v1/fanout` stores each signed
 * event in a stream on the server this relay connects to, and the forwarder,
 * in every worker, has it acknowledged by its destination's inbox. While the
 * way there is down (a bridged homeserver's leafnode link, a destination
 * without its stream) events wait, each retried with backoff on its own, so
 * one unreachable destination holds up no other.
 *
 * An event whose lifetime is running out is signed again with the same `jti`,
 * a fresh `iat` and `exp`: the destination judges expiry when its inbox stored
 * the event (docs/protocol.md §5), and dedupes by `(iss, jti)`, so a sender's
 * outage longer than a lifetime loses nothing and stores nothing twice.
 */
import type { JetStreamClient, JsMsg } from "@nats-io/jetstream";
import type { Logger } from "pino";
import type { RelayMetrics } from "./metrics.ts";
import { storedClaims } from "./protocol/claims.ts";
import type { SigningKey } from "./protocol/keys.ts";
import { signEvent } from "./protocol/sign.ts";
import { readCompactJws, verifySignature } from "./protocol/jws.ts";
import { destinationOfOutboxSubject, inboxSubject } from "./protocol/subjects.ts";
import { publishEvent } from "./transport/publisher.ts";

export interface ForwarderDeps {
  readonly self: string;
  /** Publishes to destinations' inboxes (a JetStream publish is addressed by subject alone). */
  readonly js: JetStreamClient;
  /** The key that signs now (a rotation changes it without a restart). */
  readonly signingKey: () => SigningKey;
  /** Any of this homeserver's keys, by kid: the outbox holds events signed before a rotation too. */
  readonly ownKey: (kid: string) => SigningKey | undefined;
  readonly now: () => number;
  readonly eventLifetimeSeconds: number;
  readonly resignWithinSeconds: number;
  readonly publishTimeoutMs: number;
  readonly metrics: RelayMetrics;
  readonly log: Logger;
}

/** Redelivery after a failed attempt: 1 s, doubling to at most a minute. */
export function retryDelayMs(deliveryCount: number): number {
  return Math.min(60_000, 1000 * 2 ** Math.min(6, Math.max(0, deliveryCount - 1)));
}

/**
 * The event as it should go out now: as stored, or signed again if its lifetime
 * is running out, or if a key other than the current one signed it (after a
 * rotation, a receiver accepts the old key only for a grace after its
 * retirement, and an outbox may hold events for longer).
 */
export async function freshEvent(token: string, signedBy: string, deps: Pick<ForwarderDeps, "signingKey" | "now" | "eventLifetimeSeconds" | "resignWithinSeconds">): Promise<{ token: string; resigned: boolean }> {
  const claims = storedClaims(token);
  const now = Math.floor(deps.now());
  if (claims.exp - now > deps.resignWithinSeconds && signedBy === deps.signingKey().kid) return { token, resigned: false };
  return { token: await signEvent({ ...claims, iat: now, exp: now + deps.eventLifetimeSeconds }, deps.signingKey()), resigned: true };
}

export function createForwarder(deps: ForwarderDeps): { handle(batch: JsMsg[]): Promise<void> } {
  async function forward(m: JsMsg): Promise<void> {
    const destination = destinationOfOutboxSubject(m.subject);
    if (destination === undefined) {
      // Nothing of ours publishes such a subject: drop it rather than retry it forever.
      deps.log.error({ subject: m.subject }, "outbox message on an unexpected subject; dropped");
      m.term("not an outbox subject");
      return;
    }
    // Only what this relay signed, from itself, to the destination its subject names, is ever sent or
    // signed again: the outbox is on a server others may reach, and re-signing is signing.
    const jws = readCompactJws(m.data);
    const signer = jws.ok && typeof jws.header.kid === "string" ? deps.ownKey(jws.header.kid) : undefined;
    if (!jws.ok || !signer || !verifySignature(jws, Buffer.from(signer.publicJwk.x, "base64url")) || jws.payload.iss !== deps.self || jws.payload.aud !== destination) {
      deps.log.error({ subject: m.subject, seq: m.seq }, "outbox message not signed by this homeserver for its destination; dropped");
      m.term("not ours");
      return;
    }
    try {
      const { token, resigned } = await freshEvent(Buffer.from(m.data).toString("latin1"), signer.kid, deps);
      if (resigned) deps.metrics.outboxResigned.inc();
      await publishEvent(deps.js, inboxSubject(destination, deps.self), Buffer.from(token, "latin1"), deps.publishTimeoutMs);
      m.ack();
      deps.metrics.outboxForwarded.inc({ destination });
    } catch (err) {
      deps.metrics.outboxFailures.inc({ destination });
      const delay = retryDelayMs(m.info.deliveryCount);
      deps.log.warn({ destination, seq: m.seq, delayMs: delay, err: (err as Error).message }, "outboxed event not delivered yet");
      m.nak(delay);
    }
  }
  return {
    async handle(batch) {
      await Promise.all(batch.map(forward));
    },
  };
}
