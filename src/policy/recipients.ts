/**
 * Step 7 of DESIGN §5: which recipients of a verified event are accepted.
 * A pure decision over facts the store loaded for the whole batch, so 1,000
 * recipients cost no per-recipient round trip.
 *
 * The checks run in the protocol's order: capability checks first (so a sender
 * without one learns nothing about which clients exist), then the client, its
 * blocks, and rate limits. Today only "is a known local client" is decided;
 * capabilities, blocks and rate limits fill in the same shape.
 */
import type { RecipientReason } from "../errors.ts";
import type { EventClaims } from "../protocol/claims.ts";

export interface RecipientFacts {
  /** Local clients that exist (and are locked for this commit). */
  readonly knownClients: ReadonlySet<string>;
}

export interface RecipientDecision {
  readonly accepted: readonly string[];
  readonly refused: readonly { readonly cid: string; readonly reason: RecipientReason }[];
}

export function decideRecipients(claims: EventClaims, facts: RecipientFacts): RecipientDecision {
  const accepted: string[] = [];
  const refused: { cid: string; reason: RecipientReason }[] = [];
  for (const { cid } of claims.rcpt) {
    if (!facts.knownClients.has(cid)) refused.push({ cid, reason: "unknown_client" });
    else accepted.push(cid);
  }
  return { accepted, refused };
}
