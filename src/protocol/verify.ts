/**
 * Acceptance steps 1–5 of DESIGN §5 as a function of data: the event bytes, the
 * subject it arrived on, a key resolver, and the time. Step 6 (duplicates) needs
 * the store and lives with the commit; step 7 is per recipient, in policy/.
 *
 * The hot path verifies the signature with libsodium over the parsed token, not
 * with jose: measured here (`npm run bench`), node:crypto's Ed25519 verify costs
 * about 120 µs per event (OpenSSL 3 sets up a context per call), libsodium's
 * about 63 µs, and jose's compactVerify 40 % more than node:crypto. libsodium is
 * also the stricter verifier (it rejects non-canonical and small-order points).
 * The strictness jose would give is reproduced: the alg allow-list and typ are
 * checked before any key is looked up or used, and only the header members this
 * protocol defines are allowed, so no embedded key (jwk, jku, x5c…) is ever read.
 */
import type { EventReason } from "../errors.ts";
import { decodedLength, isCanonicalBase64url } from "./base64url.ts";
import { EVENT_ALG, EVENT_TYP, eventClaimsSchema, wellFormedClaims, type EventClaims, type EventLimits } from "./claims.ts";
import { readCompactJws, verifySignature } from "./jws.ts";
import { isValidAt, type VerificationKey } from "./keys.ts";
import { parseGroupId, splitKid } from "./names.ts";
import { senderOfInboxSubject } from "./subjects.ts";

/** What a lookup of a `kid` found: the key, none (refuse `unknown_key`), or not yet (a fetch of the peer's key set runs or failed). */
export type KeyLookup =
  | { readonly status: "found"; readonly key: VerificationKey }
  | { readonly status: "unknown"; readonly detail: string }
  | { readonly status: "wait"; readonly retryMs: number; readonly detail: string };

/** The federated homeservers and their keys (src/keys/registry.ts). */
export interface KeyResolver {
  isKnown(homeserver: string): boolean;
  /**
   * Never waits for a fetch: an unknown kid may start one in the background and
   * answer `wait`. `receivedAt` (seconds): when the message reached our stream.
   */
  lookup(kid: string, receivedAt: number): KeyLookup;
}

export interface VerifyContext {
  /** This homeserver: events must be addressed (`aud`) to it. */
  readonly self: string;
  readonly limits: EventLimits;
  readonly keys: KeyResolver;
  /** The recipient's server-level policy (allow/deny rules). */
  readonly isSenderAllowed: (iss: string) => boolean;
  /** Current time in seconds. */
  readonly now: number;
}

/**
 * A verified event's claims, without the body: the body stays in the bytes, and
 * a worker holds a batch of events until it commits (a 1 KiB body held through
 * the commit is promoted by the garbage collector and marked again and again).
 */
export type VerifiedClaims = Omit<EventClaims, "body">;

export interface VerifiedEvent {
  /** The compact JWS exactly as received: what the signature covers, and what is stored. */
  readonly bytes: Uint8Array;
  readonly claims: VerifiedClaims;
  readonly key: VerificationKey;
}

export type Verdict =
  | { readonly ok: true; readonly event: VerifiedEvent }
  /** Its key is not known yet (the peer's key set is being fetched, or could not be): look again after `retryMs`. */
  | { readonly ok: false; readonly deferred: true; readonly retryMs: number; readonly detail: string }
  | {
      readonly ok: false;
      readonly deferred?: undefined;
      readonly reason: EventReason;
      readonly detail: string;
      /** What the event claimed, when it got that far: for the audit record only. */
      readonly claimed?: { readonly iss: string; readonly jti: string };
    };

export const ALLOWED_HEADER: ReadonlySet<string> = new Set(["alg", "kid", "typ"]);

/**
 * A short, printable rendering of an attacker-chosen value for a refusal's
 * detail: never recursive (a header can nest 100,000 arrays deep, which
 * JSON.stringify would overflow on) and never with control characters (a NUL
 * cannot be stored in Postgres text).
 */
export function show(value: unknown): string {
  if (typeof value === "string") {
    const cut = value.length > 64 ? `${value.slice(0, 64)}…` : value;
    // eslint-disable-next-line no-control-regex
    return `"${cut.replace(/[\u0000-\u001f\u007f"\\]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)}"`;
  }
  if (typeof value === "number" || typeof value === "boolean" || value === null) return String(value);
  if (value === undefined) return "(missing)";
  return Array.isArray(value) ? "(an array)" : `(${typeof value === "object" ? "an object" : typeof value})`;
}

function refuse(reason: EventReason, detail: string, claimed?: { iss: string; jti: string }): Verdict {
  return claimed ? { ok: false, reason, detail, claimed } : { ok: false, reason, detail };
}

export async function verifyEvent(data: Uint8Array, subject: string, ctx: VerifyContext): Promise<Verdict> {
  // Step 1: size, shape, header.
  if (data.byteLength > ctx.limits.maxMessageBytes) {
    return refuse("too_large", `message is ${data.byteLength} bytes, limit ${ctx.limits.maxMessageBytes}`);
  }
  const jws = readCompactJws(data);
  if (!jws.ok) return refuse("malformed", jws.detail);
  const { header, payload, bytes } = jws;
  for (const name of Object.keys(header)) {
    if (!ALLOWED_HEADER.has(name)) return refuse("malformed", `header member ${show(name)} is not allowed`);
  }
  if (header.alg !== EVENT_ALG) return refuse("bad_alg", `alg ${show(header.alg)} is not EdDSA`);
  if (header.typ !== EVENT_TYP) return refuse("bad_typ", `typ ${show(header.typ)} is not ${EVENT_TYP}`);

  let claims = wellFormedClaims(payload);
  if (!claims) {
    const parsed = eventClaimsSchema.safeParse(payload);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      return refuse("malformed", `claim ${issue.path.join(".") || "(root)"}: ${issue.message}`);
    }
    claims = parsed.data;
  }
  const claimed = { iss: claims.iss, jti: claims.jti };
  if (!isCanonicalBase64url(claims.body)) return refuse("malformed", "body is not canonical base64url", claimed);
  const bodyBytes = decodedLength(claims.body);
  if (bodyBytes > ctx.limits.maxBodyBytes) {
    return refuse("too_large", `body is ${bodyBytes} bytes, limit ${ctx.limits.maxBodyBytes}`, claimed);
  }
  const group = parseGroupId(claims.grp);
  if (!group) return refuse("malformed", `grp ${show(claims.grp)} is not <local>@<owner>`, claimed);
  const kid = header.kid;
  const kidParts = typeof kid === "string" ? splitKid(kid) : undefined;
  if (typeof kid !== "string" || !kidParts || kidParts.homeserver !== claims.iss) {
    return refuse("unknown_key", `kid ${show(kid)} is not ${claims.iss}#<key-id>`, claimed);
  }

  // Step 2: the sender and its key.
  if (!ctx.keys.isKnown(claims.iss)) {
    return refuse("unknown_sender", `${claims.iss} is not a federated homeserver`, claimed);
  }
  if (!ctx.isSenderAllowed(claims.iss)) {
    return refuse("sender_denied", `${claims.iss} is denied by this homeserver's policy`, claimed);
  }
  const found = ctx.keys.lookup(kid, ctx.now);
  if (found.status === "wait") return { ok: false, deferred: true, retryMs: found.retryMs, detail: found.detail };
  if (found.status === "unknown") return refuse("unknown_key", found.detail, claimed);
  const key = found.key;
  if (!isValidAt(key, claims.iat)) return refuse("unknown_key", `key ${kid} is not valid at iat ${claims.iat}`, claimed);

  // Step 3: the signature, over the bytes as received.
  if (!verifySignature(jws, key.raw)) {
    return refuse("bad_signature", `signature does not verify with ${kid}`, claimed);
  }

  // Step 4: addressing. Only now are the claims the sender's own words.
  if (claims.aud !== ctx.self) return refuse("wrong_audience", `aud ${claims.aud} is not ${ctx.self}`, claimed);
  const subjectSender = senderOfInboxSubject(subject);
  if (subjectSender !== claims.iss) {
    return refuse("subject_mismatch", `iss ${claims.iss} did not arrive on its own subject (${subject})`, claimed);
  }
  if (group.owner !== claims.iss) {
    return refuse("not_group_owner", `group ${claims.grp} is owned by ${group.owner}, not ${claims.iss}`, claimed);
  }

  // Step 5: time.
  if (claims.iat > ctx.now + ctx.limits.maxFutureSkewSeconds) {
    return refuse("not_yet_valid", `iat ${claims.iat} is in the future (now ${ctx.now})`, claimed);
  }
  if (claims.exp <= ctx.now) return refuse("expired", `exp ${claims.exp} has passed (now ${ctx.now})`, claimed);
  if (claims.exp - claims.iat > ctx.limits.maxLifetimeSeconds) {
    return refuse("lifetime_too_long", `lifetime ${claims.exp - claims.iat}s exceeds ${ctx.limits.maxLifetimeSeconds}s`, claimed);
  }

  const { body: _body, ...kept } = claims;
  return { ok: true, event: { bytes, claims: kept, key } };
}
