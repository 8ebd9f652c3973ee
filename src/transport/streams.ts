/** The destination's inbox stream and its durable consumer (DESIGN §4). */
import {
  AckPolicy, DeliverPolicy, DiscardPolicy, JetStreamApiCodes, JetStreamApiError, RetentionPolicy, StorageType,
  type JetStreamManager, type StreamConfig,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { inboxStreamName, inboxWildcard, reportStreamName, reportWildcard } from "../protocol/subjects.ts";

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

async function upsertStream(jsm: JetStreamManager, config: Partial<StreamConfig> & { name: string }): Promise<void> {
  try {
    await jsm.streams.info(config.name);
    await jsm.streams.update(config.name, config);
  } catch (err) {
    if (!(err instanceof JetStreamApiError && err.code === JetStreamApiCodes.StreamNotFound)) throw err;
    await jsm.streams.add(config);
  }
}

/** Creates or updates the inbox stream and the workers' shared durable pull consumer. */
export async function ensureInbox(jsm: JetStreamManager, homeserver: string, inbox: InboxSettings, consumer: ConsumerSettings): Promise<void> {
  const config = inboxStreamConfig(homeserver, inbox);
  await upsertStream(jsm, config);
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

/** The sender's stream for reports about its events, and the consumer that records them. */
export async function ensureReportStream(jsm: JetStreamManager, homeserver: string, consumer: string, replicas: number): Promise<void> {
  const config: Partial<StreamConfig> & { name: string } = {
    name: reportStreamName(homeserver),
    subjects: [reportWildcard(homeserver)],
    storage: StorageType.File,
    retention: RetentionPolicy.Workqueue,
    num_replicas: replicas,
    duplicate_window: nanos(120_000),
    // Reports are proof for the sender; a week covers any outage of ours.
    max_age: nanos(7 * 24 * 3600 * 1000),
    max_msg_size: 256 * 1024,
  };
  await upsertStream(jsm, config);
  await jsm.consumers.add(config.name, {
    durable_name: consumer,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(30_000),
    max_deliver: -1,
  });
}
