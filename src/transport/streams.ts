/** The destination's inbox stream and its durable consumer (DESIGN §4). */
import {
  AckPolicy, DeliverPolicy, DiscardPolicy, JetStreamApiCodes, JetStreamApiError, RetentionPolicy, StorageType,
  type JetStreamManager, type StreamConfig,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { inboxStreamName, inboxWildcard } from "../protocol/subjects.ts";

export interface InboxSettings {
  readonly replicas: number;
  readonly maxMessagesPerSender: number;
  readonly duplicateWindowSeconds: number;
  readonly maxMessageBytes: number;
}

export interface ConsumerSettings {
  readonly consumer: string;
  readonly ackWaitSeconds: number;
  readonly maxAckPending: number;
}

export function inboxStreamConfig(homeserver: string, s: InboxSettings): Partial<StreamConfig> & { name: string } {
  return {
    name: inboxStreamName(homeserver),
    subjects: [inboxWildcard(homeserver)],
    storage: StorageType.File,
    // Each event is consumed once by the worker pool, then it lives in Postgres.
    retention: RetentionPolicy.Workqueue,
    num_replicas: s.replicas,
    duplicate_window: nanos(s.duplicateWindowSeconds * 1000),
    // One subject per sender: this is the per-sender backlog quota. Discard-new
    // per subject refuses a flooding sender's publish instead of dropping others' events.
    max_msgs_per_subject: s.maxMessagesPerSender,
    discard: DiscardPolicy.New,
    discard_new_per_subject: true,
    // The JWS plus NATS headers; larger never passes verification anyway.
    max_msg_size: s.maxMessageBytes + 4096,
  };
}

/** Creates or updates the inbox stream and the workers' shared durable pull consumer. */
export async function ensureInbox(jsm: JetStreamManager, homeserver: string, inbox: InboxSettings, consumer: ConsumerSettings): Promise<void> {
  const config = inboxStreamConfig(homeserver, inbox);
  try {
    await jsm.streams.info(config.name);
    await jsm.streams.update(config.name, config);
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)) throw err;
    await jsm.streams.add(config);
  }
  await jsm.consumers.add(config.name, {
    durable_name: consumer.consumer,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(consumer.ackWaitSeconds * 1000),
    max_ack_pending: consumer.maxAckPending,
    // Never give up on an event: transient failures are retried until they pass,
    // permanent ones are terminated explicitly with their reason.
    max_deliver: -1,
  });
}
