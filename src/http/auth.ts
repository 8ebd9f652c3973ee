/** The two credentials of the API: the backend's service token, and a client's bearer token (src/client-tokens.ts). */
import { timingSafeEqual, createHash } from "node:crypto";
import { RelayError } from "../errors.ts";
import type { FailureThrottle } from "./limits.ts";

export function bearerOf(header: string | undefined): string {
  const match = /^Bearer ([^\s]+)$/.exec(header ?? "");
  if (!match) throw new RelayError("unauthorized", "missing or malformed Authorization: Bearer header");
  return match[1]!;
}

/** Constant-time, and length-independent: both sides are hashed first. */
function sameSecret(given: string, expected: string): boolean {
  return timingSafeEqual(createHash("sha256").update(given).digest(), createHash("sha256").update(expected).digest());
}

export interface ServiceAuth {
  /** Throws `unauthorized`, or `too_many_requests` while `source` is throttled for failing too often. */
  check(header: string | undefined, source: string): void;
}

/**
 * The service token, checked only while its caller's source is not throttled:
 * each failure spends from the source's bucket (src/http/limits.ts), and a
 * source with none left is refused unchecked, so guessing runs at the refill
 * rate however fast it asks.
 */
export function createServiceAuth(options: { token: string | undefined; throttle: FailureThrottle; now: () => number }): ServiceAuth {
  const { token, throttle, now } = options;
  return {
    check(header, source) {
      const at = now();
      const retryAfterSeconds = throttle.retryAfter(source, at);
      if (retryAfterSeconds > 0) {
        throw new RelayError("too_many_requests", `too many failed service credentials from this address; retry in ${retryAfterSeconds} s`, { retryAfterSeconds });
      }
      try {
        if (token === undefined) throw new RelayError("unauthorized", "no service token is configured (http.serviceToken)");
        if (!sameSecret(bearerOf(header), token)) throw new RelayError("unauthorized", "invalid service token");
      } catch (err) {
        throttle.failed(source, at);
        throw err;
      }
    },
  };
}
