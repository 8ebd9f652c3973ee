/**
 * One error type, with stable codes. The protocol's rejection reasons (DESIGN §7)
 * are codes here too, so a refused event, an HTTP error and a CLI failure all
 * speak the same vocabulary.
 */

/** Why a whole event is refused (§5 steps 1–6). Wire values: never rename. */
export const EVENT_REASONS = [
  "malformed",
  "too_large",
  "bad_alg",
  "bad_typ",
  "unknown_sender",
  "sender_denied",
  "unknown_key",
  "bad_signature",
  "wrong_audience",
  "subject_mismatch",
  "not_group_owner",
  "not_yet_valid",
  "expired",
  "lifetime_too_long",
  "duplicate",
] as const;

/** Why one recipient of an accepted event is refused (§5 step 7). Wire values. */
export const RECIPIENT_REASONS = [
  "no_capability",
  "capability_revoked",
  "capability_mismatch",
  "blocked_by_client",
  "unknown_client",
  "rate_limited",
] as const;

export type EventReason = (typeof EVENT_REASONS)[number];
export type RecipientReason = (typeof RECIPIENT_REASONS)[number];
export type Reason = EventReason | RecipientReason;

/** Codes that are not protocol reasons: local failures of the API, CLI and runtime. */
export const LOCAL_CODES = [
  "bad_request",
  "unauthorized",
  "forbidden",
  "not_found",
  "conflict",
  "payload_too_large",
  "too_many_requests",
  "uri_too_long",
  "headers_too_large",
  "request_timeout",
  "bad_cursor",
  "config_invalid",
  "publish_failed",
  "unavailable",
  "internal",
] as const;
export type LocalCode = (typeof LOCAL_CODES)[number];

export type ErrorCode = Reason | LocalCode;

/**
 * What each code means at the edges: the HTTP status it maps to, and for event
 * reasons, what the consumer does with the JetStream message. `term` stops
 * redelivery (a permanent refusal), `ack` marks it done (a duplicate was already
 * stored), `nak` asks for redelivery (a transient failure).
 */
export const HTTP_STATUS: Readonly<Record<ErrorCode, number>> = Object.freeze({
  malformed: 400,
  too_large: 413,
  bad_alg: 400,
  bad_typ: 400,
  unknown_sender: 403,
  sender_denied: 403,
  unknown_key: 403,
  bad_signature: 403,
  wrong_audience: 400,
  subject_mismatch: 403,
  not_group_owner: 403,
  not_yet_valid: 400,
  expired: 400,
  lifetime_too_long: 400,
  duplicate: 409,
  no_capability: 403,
  capability_revoked: 403,
  capability_mismatch: 403,
  blocked_by_client: 403,
  unknown_client: 404,
  rate_limited: 429,
  bad_request: 400,
  unauthorized: 401,
  forbidden: 403,
  not_found: 404,
  conflict: 409,
  payload_too_large: 413,
  too_many_requests: 429,
  uri_too_long: 414,
  headers_too_large: 431,
  request_timeout: 408,
  bad_cursor: 400,
  config_invalid: 500,
  publish_failed: 503,
  unavailable: 503,
  internal: 500,
});

export type Disposition = "ack" | "term";

/** A refused event is never retried (the bytes will not change); a duplicate is done. */
export function dispositionOf(reason: EventReason): Disposition {
  return reason === "duplicate" ? "ack" : "term";
}

export class RelayError extends Error {
  override readonly name = "RelayError";
  readonly code: ErrorCode;
  /** With `too_many_requests`: when trying again may succeed (HTTP Retry-After). */
  readonly retryAfterSeconds: number | undefined;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; retryAfterSeconds?: number }) {
    super(message, options);
    this.code = code;
    this.retryAfterSeconds = options?.retryAfterSeconds;
  }

  get httpStatus(): number {
    return HTTP_STATUS[this.code];
  }
}

export function isRelayError(err: unknown, code?: ErrorCode): err is RelayError {
  return err instanceof RelayError && (code === undefined || err.code === code);
}
