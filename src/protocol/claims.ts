/** The fan-out event's claims (DESIGN §5, wire) and their limits. Pure. */
import { z } from "zod";
import { isClientId, isEventId, isHomeserverName } from "./names.ts";

export const EVENT_TYP = "fedrelay-fanout+jwt";
export const REPORT_TYP = "fedrelay-report+jwt";
export const CLIENT_TOKEN_TYP = "fedrelay-client+jwt";
export const EVENT_ALG = "EdDSA";

/** Hard caps of the wire protocol; deployments may only lower the body limit. */
export const MAX_RECIPIENTS = 1000;
/** A capability is 32 random bytes in base64url (43 characters); leave room for future formats. */
export const MAX_CAPABILITY_LENGTH = 256;
export const MAX_CTYPE_LENGTH = 255;

export interface EventLimits {
  /** The whole compact JWS, in bytes. */
  readonly maxMessageBytes: number;
  /** The decoded body, in bytes. */
  readonly maxBodyBytes: number;
  /** How far `iat` may lie in the future (clock skew between homeservers). */
  readonly maxFutureSkewSeconds: number;
  /** The longest `exp - iat` accepted. */
  readonly maxLifetimeSeconds: number;
}

export const DEFAULT_EVENT_LIMITS: EventLimits = Object.freeze({
  maxMessageBytes: 1024 * 1024, // DESIGN §5 step 1
  maxBodyBytes: 64 * 1024, // DESIGN §5: 64 KiB decoded by default
  maxFutureSkewSeconds: 5 * 60, // DESIGN §5 step 5
  maxLifetimeSeconds: 7 * 24 * 3600, // DESIGN §5: at most 7 days
});

const homeserver = z.string().refine(isHomeserverName, "not a homeserver name");
const seconds = z.number().int().min(0).max(2 ** 40);

export const recipientSchema = z.object({
  cid: z.string().refine(isClientId, "not a client id"),
  cap: z.string().min(1).max(MAX_CAPABILITY_LENGTH).optional(),
});

/** Unknown claims are ignored (forward compatibility); known ones are typed exactly. */
export const eventClaimsSchema = z.object({
  iss: homeserver,
  aud: homeserver,
  jti: z.string().refine(isEventId, "not an event id"),
  iat: seconds,
  exp: seconds,
  grp: z.string().min(3).max(128 + 1 + 253),
  rcpt: z
    .array(recipientSchema)
    .min(1)
    .max(MAX_RECIPIENTS)
    .refine((list) => new Set(list.map((r) => r.cid)).size === list.length, "duplicate cid in rcpt"),
  body: z.string(),
  ctype: z.string().min(1).max(MAX_CTYPE_LENGTH).optional(),
  seq: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).optional(),
});

export type EventClaims = z.infer<typeof eventClaimsSchema>;

/**
 * The claims of a token this homeserver already verified and stored. Never for
 * untrusted input: that goes through verifyEvent.
 */
export function storedClaims(token: string): EventClaims {
  return JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString("utf8")) as EventClaims;
}
export type Recipient = z.infer<typeof recipientSchema>;

export const reportClaimsSchema = z.object({
  iss: homeserver,
  aud: homeserver,
  jti: z.string().refine(isEventId, "not an event id"),
  iat: seconds,
  ref: z.string().refine(isEventId, "not an event id"),
  accepted: z.array(z.string().refine(isClientId)),
  refused: z.array(z.object({ cid: z.string().refine(isClientId), reason: z.string() })),
});
export type ReportClaims = z.infer<typeof reportClaimsSchema>;
