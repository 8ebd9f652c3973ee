/**
 * Step 7 of DESIGN §5: which recipients of a verified event are accepted.
 * A pure decision over facts the store loaded for the whole batch inside the
 * commit transaction, so 1,000 recipients cost no per-recipient round trip and
 * a revocation committed before the batch is always seen.
 *
 * The checks run in the protocol's order: capability checks first (so a sender
 * without one learns nothing about which clients exist), then the client, its
 * blocks, and rate limits.
 */
import type { RecipientReason } from "../errors.ts";
import type { EventClaims } from "../protocol/claims.ts";

export interface CapabilityBinding {
  readonly clientId: string;
  readonly grp: string;
  readonly owner: string;
  readonly revoked: boolean;
}

export interface RecipientFacts {
  /** Local clients that exist (and are locked for this commit). */
  readonly knownClients: ReadonlySet<string>;
  /** Bindings of the capabilities presented in the batch, by the presented secret; absent: unknown. */
  readonly capabilities: ReadonlyMap<string, CapabilityBinding>;
  /** Per client: blocked homeservers and groups. */
  readonly blocks: ReadonlyMap<string, { readonly servers: ReadonlySet<string>; readonly groups: ReadonlySet<string> }>;
}

export interface RecipientDecision {
  readonly accepted: readonly string[];
  readonly refused: readonly { readonly cid: string; readonly reason: RecipientReason }[];
}

export function decideRecipient(
  claims: Pick<EventClaims, "iss" | "grp">,
  recipient: { readonly cid: string; readonly cap?: string | undefined },
  facts: RecipientFacts,
): RecipientReason | undefined {
  if (recipient.cap === undefined) return "no_capability";
  const binding = facts.capabilities.get(recipient.cap);
  if (!binding || binding.clientId !== recipient.cid || binding.grp !== claims.grp || binding.owner !== claims.iss) {
    return "capability_mismatch";
  }
  if (binding.revoked) return "capability_revoked";
  if (!facts.knownClients.has(recipient.cid)) return "unknown_client";
  const blocks = facts.blocks.get(recipient.cid);
  if (blocks && (blocks.servers.has(claims.iss) || blocks.groups.has(claims.grp))) return "blocked_by_client";
  return undefined;
}

export function decideRecipients(claims: Pick<EventClaims, "iss" | "grp" | "rcpt">, facts: RecipientFacts): RecipientDecision {
  const accepted: string[] = [];
  const refused: { cid: string; reason: RecipientReason }[] = [];
  for (const r of claims.rcpt) {
    const reason = decideRecipient(claims, r, facts);
    if (reason) refused.push({ cid: r.cid, reason });
    else accepted.push(r.cid);
  }
  return { accepted, refused };
}
