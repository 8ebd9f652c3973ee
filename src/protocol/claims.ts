/** The fan-out event's claims (DESIGN §5, wire) and their limits. Pure. */
import { z } from "zod";
import { RECIPIENT_REASONS } from "../errors.ts";
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

const isSeconds = (v: unknown): v is number => Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 2 ** 40;
const isBoundedString = (v: unknown, min: number, max: number): v is string =>
  typeof v === "string" && v.length >= min && v.length <= max;
const isPlainObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

/**
 * `eventClaimsSchema.parse(payload)` for a payload that satisfies the schema,
 * else undefined (then the schema itself says why). The schema stays the
 * definition; this is the same rules in one pass, because zod's parse was a
 * tenth of a worker's allocations (a result object per field). It builds the
 * output as zod does: known members only, optional ones only when present.
 * test/unit/claims-fast-path.test.ts holds the two to the same answers.
 */
export function wellFormedClaims(payload: Record<string, unknown>): EventClaims | undefined {
  const { iss, aud, jti, iat, exp, grp, rcpt, body, ctype, seq } = payload;
  if (!isHomeserverName(iss) || !isHomeserverName(aud) || !isEventId(jti) || !isSeconds(iat) || !isSeconds(exp)) return undefined;
  if (!isBoundedString(grp, 3, 128 + 1 + 253) || typeof body !== "string") return undefined;
  if (!Array.isArray(rcpt) || rcpt.length < 1 || rcpt.length > MAX_RECIPIENTS) return undefined;
  if (ctype !== undefined && !isBoundedString(ctype, 1, MAX_CTYPE_LENGTH)) return undefined;
  if (seq !== undefined && !(Number.isInteger(seq) && (seq as number) >= 0 && (seq as number) <= Number.MAX_SAFE_INTEGER)) return undefined;
  const recipients: Recipient[] = [];
  const cids = new Set<string>();
  for (const r of rcpt as unknown[]) {
    if (!isPlainObject(r)) return undefined;
    const { cid, cap } = r;
    if (!isClientId(cid) || cids.has(cid)) return undefined;
    if (cap !== undefined && !isBoundedString(cap, 1, MAX_CAPABILITY_LENGTH)) return undefined;
    cids.add(cid);
    recipients.push(cap === undefined ? { cid } : { cid, cap });
  }
  return {
    iss, aud, jti, iat, exp, grp, rcpt: recipients, body,
    ...(ctype === undefined ? {} : { ctype }),
    ...(seq === undefined ? {} : { seq: seq as number }),
  };
}

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
  // At most an event's recipients, each a client id; a refusal's reason one of §7's.
  accepted: z.array(z.string().refine(isClientId)).max(MAX_RECIPIENTS),
  refused: z.array(z.object({ cid: z.string().refine(isClientId), reason: z.enum(RECIPIENT_REASONS) })).max(MAX_RECIPIENTS),
});
export type ReportClaims = z.infer<typeof reportClaimsSchema>;
