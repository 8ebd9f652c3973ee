/**
 * `fedrelay nats-provision`: the hub operator creates every homeserver's streams
 * and consumers, and puts back any that drifted, with the hub's admin key. No
 * homeserver may do this on a hub (src/federation/nats-config.ts), so this is
 * the only way they come to exist or are repaired there.
 *
 * Each homeserver's streams live in an account of their own (HUB_T); the admin
 * key's account reaches each one's JetStream API under its own prefix
 * (adminApiPrefixOf), so one connection provisions them all.
 */
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import { subjectToken } from "../protocol/names.ts";
import { ensureSpec, inboxSpec, reportSpec, type StreamSpec } from "../transport/streams.ts";
import type { Federation } from "./federation.ts";
import { adminApiPrefixOf, HUB_INBOX_CONSUMER, replicasOf } from "./nats-config.ts";

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

/** The admin's view of one homeserver's JetStream (its HUB_T account), on a connection with the admin key. */
export function adminManager(nc: NatsConnection, homeserver: string): Promise<JetStreamManager> {
  return jetstreamManager(nc, { apiPrefix: adminApiPrefixOf(homeserver), checkAPI: false });
}

export interface ProvisionResult {
  readonly homeserver: string;
  readonly repaired: readonly string[];
  readonly problems: readonly string[];
}

/** `nc`: a connection with the hub admin's key. */
export async function provisionHub(nc: NatsConnection, fed: Federation): Promise<ProvisionResult[]> {
  const results: ProvisionResult[] = [];
  for (const { homeserver, specs } of hubSpecs(fed)) {
    const jsm = await adminManager(nc, homeserver);
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
