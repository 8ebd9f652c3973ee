/**
 * Delivery reports (DESIGN §8): the destination's signed statement of what it
 * accepted and refused of one event. Not on the hot path, so jose verifies.
 */
import { compactVerify, decodeProtectedHeader } from "jose";
import type { RecipientReason } from "../errors.ts";
import { EVENT_ALG, REPORT_TYP, reportClaimsSchema, type ReportClaims } from "./claims.ts";
import { uuidv7 } from "./event-id.ts";
import { isValidAt } from "./keys.ts";
import { splitKid } from "./names.ts";
import type { KeyResolver } from "./verify.ts";

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

export type ReportVerdict = { ok: true; claims: ReportClaims } | { ok: false; detail: string };

/** A report is accepted only from the destination it names, on its own subject, addressed to us. */
export async function verifyReport(token: string, subjectSender: string | undefined, ctx: { self: string; keys: KeyResolver }): Promise<ReportVerdict> {
  let header;
  try {
    header = decodeProtectedHeader(token);
  } catch {
    return { ok: false, detail: "not a JWS" };
  }
  if (header.alg !== EVENT_ALG || header.typ !== REPORT_TYP || typeof header.kid !== "string") {
    return { ok: false, detail: "header must be EdDSA, fedrelay-report+jwt, with a kid" };
  }
  const kid = splitKid(header.kid);
  if (!kid || kid.homeserver !== subjectSender) return { ok: false, detail: `kid ${header.kid} does not name the subject's sender` };
  if (!ctx.keys.isKnown(kid.homeserver)) return { ok: false, detail: `${kid.homeserver} is not federated` };
  const key = await ctx.keys.resolve(header.kid);
  if (!key) return { ok: false, detail: `unknown key ${header.kid}` };
  let payload: unknown;
  try {
    const result = await compactVerify(token, key.publicKey, { algorithms: [EVENT_ALG] });
    payload = JSON.parse(new TextDecoder().decode(result.payload));
  } catch (err) {
    return { ok: false, detail: `signature: ${(err as Error).message}` };
  }
  const parsed = reportClaimsSchema.safeParse(payload);
  if (!parsed.success) return { ok: false, detail: `claims: ${parsed.error.issues[0]!.message}` };
  const claims = parsed.data;
  if (claims.iss !== kid.homeserver) return { ok: false, detail: "iss does not match kid" };
  if (claims.aud !== ctx.self) return { ok: false, detail: `aud ${claims.aud} is not ${ctx.self}` };
  if (!isValidAt(key, claims.iat)) return { ok: false, detail: `key ${header.kid} not valid at iat` };
  return { ok: true, claims };
}
