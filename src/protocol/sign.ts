/**
 * Signing events and reports: every fan-out signs an event per destination, and
 * every stored event is answered by a signed report, so this is a hot path.
 * libsodium signs here, jose no longer does. Measured (npm run bench:e2e,
 * --cpu-prof, a group of one): jose's CompactSign goes through WebCrypto, and
 * its Ed25519 signing took 11 % of the owner's CPU, ~0.4 ms a fan-out;
 * libsodium signs in ~25 µs. Ed25519 is deterministic: the tokens are the same
 * bytes jose produced (test/unit/sign.test.ts). Pure but for the key.
 */
import sodium from "sodium-native";
import { EVENT_ALG, EVENT_TYP, REPORT_TYP, type EventClaims, type ReportClaims } from "./claims.ts";
import type { SigningKey } from "./keys.ts";

export function signToken(payload: object, typ: string, key: SigningKey): Promise<string> {
  const input = `${Buffer.from(JSON.stringify({ alg: EVENT_ALG, kid: key.kid, typ })).toString("base64url")}.${Buffer.from(JSON.stringify(payload)).toString("base64url")}`;
  const signature = Buffer.alloc(sodium.crypto_sign_BYTES);
  sodium.crypto_sign_detached(signature, Buffer.from(input, "latin1"), key.secretKey);
  return Promise.resolve(`${input}.${signature.toString("base64url")}`);
}

export function signEvent(claims: EventClaims, key: SigningKey): Promise<string> {
  return signToken(claims, EVENT_TYP, key);
}

export function signReport(claims: ReportClaims, key: SigningKey): Promise<string> {
  return signToken(claims, REPORT_TYP, key);
}
