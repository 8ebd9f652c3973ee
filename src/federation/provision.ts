/**
 * `fedrelay nats-provision`: the hub operator creates every homeserver's streams
 * and consumers, and puts back any that drifted, with the hub's admin key. No
 * homeserver may do this on a hub (src/federation/nats-config.ts), so this is
 * the only way they come to exist or are repaired there.
 */
import type { JetStreamManager } from "@nats-io/jetstream";
import { subjectToken } from "../protocol/names.ts";
import { ensureSpec, inboxSpec, reportSpec, type StreamSpec } from "../transport/streams.ts";
import type { Federation } from "./federation.ts";
import { HUB_INBOX_CONSUMER, replicasOf } from "./nats-config.ts";

/** What the hub holds for each homeserver: the same specs its relay checks against (relaySettings). */
export function hubSpecs(fed: Federation): { homeserver: string; specs: StreamSpec[] }[] {
  const s = fed.streams;
  const replicas = replicasOf(fed);
  const members = Object.keys(fed.homeservers).sort();
  return members.map((homeserver) => ({
    homeserver,
    specs: [
      // A consumer for each member's events (its own included): only members can publish here.
      inboxSpec(homeserver, { replicas, maxMessagesPerSender: s.maxMessagesPerSender, duplicateWindowSeconds: s.duplicateWindowSeconds, maxMessageBytes: s.maxMessageBytes, maxBytes: s.maxInboxBytes },
        { consumer: HUB_INBOX_CONSUMER, ackWaitSeconds: s.ackWaitSeconds, maxAckPending: s.maxAckPending }, members.map(subjectToken)),
      reportSpec(homeserver, replicas),
    ],
  }));
}

export interface ProvisionResult {
  readonly homeserver: string;
  readonly repaired: readonly string[];
  readonly problems: readonly string[];
}

export async function provisionHub(jsm: JetStreamManager, fed: Federation): Promise<ProvisionResult[]> {
  const results: ProvisionResult[] = [];
  for (const { homeserver, specs } of hubSpecs(fed)) {
    const repaired: string[] = [];
    const problems: string[] = [];
    for (const spec of specs) {
      const check = await ensureSpec(jsm, spec, true);
      repaired.push(...check.repaired);
      if (!check.ok) problems.push(check.problem);
    }
    results.push({ homeserver, repaired, problems });
  }
  return results;
}
