/**
 * Delivery reports (DESIGN §8): the destination's signed statement of what it
 * accepted and refused of one event.
 */
import type { RecipientReason } from "../errors.ts";
import { EVENT_ALG, REPORT_TYP, reportClaimsSchema, type ReportClaims } from "./claims.ts";
import { uuidv7 } from "./event-id.ts";
import { isValidAt } from "./keys.ts";
import { splitKid } from "./names.ts";
import { readCompactJws, verifySignature } from "./jws.ts";
import { ALLOWED_HEADER, show, type KeyResolver } from "./verify.ts";

export function reportClaims(input: {
  destination: string;
  sender: string;
  ref: string;
  accepted: readonly string[];
  refused: readonly { cid: string; reason: RecipientReason }[];
  now: number;
}): ReportClaims {
  return {
    iss: input.destination,
    aud: input.sender,
    jti: uuidv7(input.now * 1000),
    iat: Math.floor(input.now),
    ref: input.ref,
    accepted: [...input.accepted],
    refused: input.refused.map((r) => ({ cid: r.cid, reason: r.reason })),
  };
}

export type ReportVerdict =
  | { ok: true; claims: ReportClaims }
  | { ok: false; detail: string; retryMs?: undefined }
  /** Its key is not known yet: look again after `retryMs` (src/keys/registry.ts). */
  | { ok: false; detail: string; retryMs: number };

/**
 * A report is accepted only from the destination it names, on its own subject,
 * addressed to us, and read as strictly as an event (src/protocol/jws.ts): the
 * same canonical encoding, no repeated member, the same header members, a
 * signature verified over the bytes as received.
 */
export async function verifyReport(data: Uint8Array | string, subjectSender: string | undefined, ctx: { self: string; keys: KeyResolver; receivedAt: number }): Promise<ReportVerdict> {
  const jws = readCompactJws(typeof data === "string" ? Buffer.from(data, "latin1") : data);
  if (!jws.ok) return { ok: false, detail: jws.detail };
  const { header, payload } = jws;
  for (const name of Object.keys(header)) {
    if (!ALLOWED_HEADER.has(name)) return { ok: false, detail: `header member ${show(name)} is not allowed` };
  }
  if (header.alg !== EVENT_ALG || header.typ !== REPORT_TYP || typeof header.kid !== "string") {
    return { ok: false, detail: "header must be EdDSA, fedrelay-report+jwt, with a kid" };
  }
  const kid = splitKid(header.kid);
  if (!kid || kid.homeserver !== subjectSender) return { ok: false, detail: `kid ${show(header.kid)} does not name the subject's sender` };
  if (!ctx.keys.isKnown(kid.homeserver)) return { ok: false, detail: `${kid.homeserver} is not federated` };
  const found = ctx.keys.lookup(header.kid, ctx.receivedAt);
  if (found.status === "wait") return { ok: false, detail: found.detail, retryMs: found.retryMs };
  if (found.status === "unknown") return { ok: false, detail: `unknown key: ${found.detail}` };
  const key = found.key;
  if (!verifySignature(jws, key.raw)) return { ok: false, detail: `signature does not verify with ${header.kid}` };
  const parsed = reportClaimsSchema.safeParse(payload);
  if (!parsed.success) return { ok: false, detail: `claims: ${parsed.error.issues[0]!.message}` };
  const claims = parsed.data;
  if (claims.iss !== kid.homeserver) return { ok: false, detail: "iss does not match kid" };
  if (claims.aud !== ctx.self) return { ok: false, detail: `aud ${claims.aud} is not ${ctx.self}` };
  if (!isValidAt(key, claims.iat)) return { ok: false, detail: `key ${header.kid} not valid at iat` };
  return { ok: true, claims };
}
