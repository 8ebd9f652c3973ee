/** What the receive path's parts hand each other: a batch's inputs and what became of each event. */
import type { EventReason } from "../errors.ts";
import type { RateLimits } from "../policy/rate-limit.ts";
import type { RecipientDecision } from "../policy/recipients.ts";
import type { VerifiedEvent } from "../protocol/verify.ts";

export interface AcceptedInput {
  readonly streamSeq: number;
  readonly event: VerifiedEvent;
  /** When JetStream stored the message (seconds): how long a rate-limited event has waited. */
  readonly publishedAt?: number;
}

export interface RefusedInput {
  readonly streamSeq: number;
  readonly subject: string;
  readonly reason: EventReason;
  readonly detail: string;
  readonly claimed?: { readonly iss: string; readonly jti: string } | undefined;
  readonly sample: string;
}

export type EventOutcome =
  | { readonly streamSeq: number; readonly status: "stored"; readonly decision: RecipientDecision }
  | { readonly streamSeq: number; readonly status: "duplicate" }
  /** Over the sender's limit: not stored; redeliver after `waitSeconds`. */
  | { readonly streamSeq: number; readonly status: "delayed"; readonly waitSeconds: number };

export interface CommitOptions {
  /** Seconds since the epoch, from the relay's (injectable) clock. */
  readonly now: number;
  /** Off: no bucket is read or charged. */
  readonly rateLimits?: RateLimits | undefined;
  /** Told when the batch runs a second time after a race on a sender's bucket. */
  readonly onSenderRace?: () => void;
}

export const eventKey = (a: AcceptedInput): string => `${a.event.claims.iss}\u0000${a.event.claims.jti}`;
