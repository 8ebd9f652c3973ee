/** Signing events and reports with jose (not on the hot path). Pure but for the key. */
import { CompactSign } from "jose";
import { EVENT_ALG, EVENT_TYP, REPORT_TYP, type EventClaims, type ReportClaims } from "./claims.ts";
import type { SigningKey } from "./keys.ts";

const encoder = new TextEncoder();

export async function signToken(payload: object, typ: string, key: SigningKey): Promise<string> {
  return new CompactSign(encoder.encode(JSON.stringify(payload)))
    .setProtectedHeader({ alg: EVENT_ALG, kid: key.kid, typ })
    .sign(key.privateKey);
}

export function signEvent(claims: EventClaims, key: SigningKey): Promise<string> {
  return signToken(claims, EVENT_TYP, key);
}

export function signReport(claims: ReportClaims, key: SigningKey): Promise<string> {
  return signToken(claims, REPORT_TYP, key);
}
