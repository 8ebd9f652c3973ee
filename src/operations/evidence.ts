/**
 * Evidence of who sent an event (issue 17): the token as received, the key that
 * verified it (from the key history, never deleted) and a fresh verification,
 * and a bundle that anyone verifies with a JOSE library of their own, without
 * fedrelay: the token's signature under the bundle's JWK, the JWK's RFC 7638
 * thumbprint, and the body's SHA-256.
 *
 * The fresh verification uses jose, not the hot path's libsodium: a second,
 * independent implementation is what a dispute calls for.
 */
import { createHash } from "node:crypto";
import { compactVerify, importJWK } from "jose";
import { RelayError } from "../errors.ts";
import { checkPeerJwk, jwkThumbprint, type PublicJwk } from "../protocol/keys.ts";
import { isEventId, isHomeserverName } from "../protocol/names.ts";
import type { Db } from "../store/db.ts";

export const EVIDENCE_FORMAT = "fedrelay-evidence/1";

/** Self-contained: verify `token` with `jwk` (EdDSA), and compare the rest with its claims. */
export interface EvidenceBundle {
  readonly format: typeof EVIDENCE_FORMAT;
  /** The homeserver that received and stored the event, and when (ISO 8601). */
  readonly receivedBy: string;
  readonly receivedAt: string;
  readonly iss: string;
  readonly jti: string;
  /** The compact JWS exactly as received. */
  readonly token: string;
  /** The public key that verified it, as the key history holds it. */
  readonly jwk: PublicJwk;
  /** RFC 7638 thumbprint of `jwk`, base64url. */
  readonly thumbprint: string;
  /** SHA-256 of the decoded `body` claim, base64url. */
  readonly bodySha256: string;
}

export interface KeyHistory {
  readonly firstSeen: string;
  readonly lastSeen: string | null;
  readonly retiredAt: string | null;
  readonly revokedAt: string | null;
}

export type Evidence =
  | { readonly kept: "token"; readonly bundle: EvidenceBundle; readonly key: KeyHistory; readonly verification: Verification }
  /** Delivered to no one: only a record was kept (migrations/011), so nothing can be verified again. */
  | {
      readonly kept: "record"; readonly receivedBy: string; readonly receivedAt: string; readonly iss: string; readonly jti: string;
      readonly tokenSha256: string; readonly tokenBytes: number; readonly thumbprint: string; readonly refused: readonly [string, string][];
    };

export interface Verification {
  readonly ok: boolean;
  readonly detail: string;
}

/** Verifies a bundle as its reader would, with jose; every failure says which part does not hold. */
export async function verifyEvidenceBundle(bundle: EvidenceBundle): Promise<Verification> {
  const checked = checkPeerJwk(bundle.jwk);
  if (!checked.ok) return { ok: false, detail: `the key is not one this protocol accepts (${checked.reason}): ${checked.detail}` };
  if (jwkThumbprint(bundle.jwk) !== bundle.thumbprint) return { ok: false, detail: "the key's thumbprint is not the bundle's" };
  let payload: Record<string, unknown>;
  let header: Record<string, unknown>;
  try {
    const key = await importJWK({ kty: "OKP", crv: "Ed25519", x: bundle.jwk.x }, "EdDSA");
    const result = await compactVerify(bundle.token, key, { algorithms: ["EdDSA"] });
    header = result.protectedHeader as Record<string, unknown>;
    payload = JSON.parse(new TextDecoder().decode(result.payload)) as Record<string, unknown>;
  } catch (err) {
    return { ok: false, detail: `the signature does not verify with the key: ${(err as Error).message}` };
  }
  if (header.kid !== bundle.jwk.kid) return { ok: false, detail: `the token names key ${String(header.kid)}, not ${bundle.jwk.kid}` };
  if (payload.iss !== bundle.iss || payload.jti !== bundle.jti) return { ok: false, detail: "the token's iss or jti is not the bundle's" };
  const body = typeof payload.body === "string" ? Buffer.from(payload.body, "base64url") : undefined;
  if (!body || createHash("sha256").update(body).digest("base64url") !== bundle.bodySha256) return { ok: false, detail: "the body's SHA-256 is not the bundle's" };
  return { ok: true, detail: `signed by ${bundle.jwk.kid} (key ${bundle.thumbprint}); verified with jose` };
}

const iso = (d: Date | null): string | null => (d === null ? null : d.toISOString());

/**
 * The evidence of event `jti`, from `from` when given, as `self` received it. A
 * jti is unique per sender only: if several senders used it, `from` must say which.
 */
export function evidenceOf(jti: string | undefined, from?: string): (db: Db, self: string) => Promise<Evidence> {
  if (!isEventId(jti)) throw new RelayError("bad_request", `needs an event id ([A-Za-z0-9_-], 1–64), got ${JSON.stringify(jti ?? "")}`);
  if (from !== undefined && !isHomeserverName(from)) throw new RelayError("bad_request", `--from must be a homeserver name, got ${JSON.stringify(from)}`);
  return async (db, self) => {
    let query = db.kysely.selectFrom("events").selectAll().where("jti", "=", jti);
    if (from !== undefined) query = query.where("iss", "=", from);
    const rows = await query.limit(10).execute();
    if (rows.length === 0) throw new RelayError("not_found", `no event ${jti}${from ? ` from ${from}` : ""} is stored`);
    if (rows.length > 1) throw new RelayError("conflict", `event id ${jti} was used by ${rows.map((r) => r.iss).join(", ")}: name one with --from`);
    const e = rows[0]!;
    const key = await db.kysely.selectFrom("peer_keys").selectAll().where("thumbprint", "=", e.key_thumbprint).executeTakeFirst();
    if (!key) throw new RelayError("internal", `event ${jti}'s key ${e.key_thumbprint} is not in the key history`);
    const receivedAt = e.received_at.toISOString();
    if (e.token === null) {
      return {
        kept: "record", receivedBy: self, receivedAt, iss: e.iss, jti: e.jti, tokenSha256: e.token_sha256!.toString("base64url"),
        tokenBytes: e.token_bytes!, thumbprint: e.key_thumbprint, refused: e.refused ?? [],
      };
    }
    const payload = JSON.parse(Buffer.from(e.token.split(".")[1]!, "base64url").toString("utf8")) as { body: string };
    const bundle: EvidenceBundle = {
      format: EVIDENCE_FORMAT, receivedBy: self, receivedAt, iss: e.iss, jti: e.jti, token: e.token,
      jwk: key.jwk as PublicJwk, thumbprint: key.thumbprint,
      bodySha256: createHash("sha256").update(Buffer.from(payload.body, "base64url")).digest("base64url"),
    };
    return {
      kept: "token", bundle,
      key: { firstSeen: key.first_seen.toISOString(), lastSeen: iso(key.last_seen), retiredAt: iso(key.retired_at), revokedAt: iso(key.revoked_at) },
      verification: await verifyEvidenceBundle(bundle),
    };
  };
}
