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

/**
 * Why an event is refused: a protocol reason (§7), or `unprocessable`, an event
 * this relay failed to commit for a reason of its own (recorded locally, never reported).
 */
export type RefusalReason = EventReason | "unprocessable";

export interface RefusedInput {
  readonly streamSeq: number;
  readonly subject: string;
  readonly reason: RefusalReason;
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
  /** Told when the batch runs a second time after a race on a bucket (a client's or a sender's). */
  readonly onBucketRace?: () => void;
  /** Queue a report for each stored event and duplicate (a worker that signs reports). */
  readonly queueReports?: boolean;
  readonly faults?: CommitFaults;
}

/**
 * Tests and chaos only (config `faults`): a commit holding an event with one of
 * these ids fails as a bug would, not as an outage: the same way every time.
 */
export interface CommitFaults {
  readonly commitFailsFor: ReadonlySet<string>;
}

export const eventKey = (a: AcceptedInput): string => `${a.event.claims.iss}\u0000${a.event.claims.jti}`;
