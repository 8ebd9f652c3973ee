/**
 * What a homeserver's streams and consumers must be (DESIGN §4), how far an
 * existing one has drifted from that, and putting it back. The relay does this
 * for its own (or, on a hub where it may not, says on /readyz what is wrong);
 * `fedrelay nats-provision` does it for every homeserver of a hub.
 *
 * A spec lists every field that matters, each with its value, and an update
 * sends all of them: nats.js merges an update into the stream's current config,
 * so a field left out (a `max_age` someone set, a `republish` to another
 * subject) would otherwise survive every repair.
 */
import {
  AckPolicy, DeliverPolicy, DiscardPolicy, JetStreamApiCodes, JetStreamApiError, ReplayPolicy, RetentionPolicy, StorageType,
  type ConsumerConfig, type JetStreamManager, type StreamConfig,
} from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import { createHash } from "node:crypto";
import { homeserverFromToken } from "../protocol/names.ts";
import {
  inboxStreamName, inboxWildcard, outboxStreamName, outboxWildcard, reportStreamName, reportWildcard,
} from "../protocol/subjects.ts";

export interface InboxSettings {
  readonly replicas: number;
  readonly maxMessagesPerSender: number;
  readonly duplicateWindowSeconds: number;
  readonly maxMessageBytes: number;
  /** All senders' events together, in bytes: past it, publishes are refused (discard new). */
  readonly maxBytes: number;
}

/**
 * A destination's reports to one sender at most (one subject per destination),
 * and all of them together, in bytes: a destination flooding reports fills only
 * its own share of the sender's report stream. The count is what fits, at the
 * largest report (max_msg_size, 256 KiB), in a quarter of the bytes, so it takes
 * four destinations flooding at once to have a fifth's reports refused (the
 * rule inboxes follow). Reports are consumed as they arrive; one refused while
 * the sender's report consumer is down waits in the destination's report queue
 * and is sent again (src/report-publisher.ts), for up to a week.
 */
const REPORT_MESSAGE_BYTES = 256 * 1024;
const REPORT_STREAM_BYTES = 1024 * 1024 * 1024;
const REPORTS_PER_DESTINATION = REPORT_STREAM_BYTES / 4 / REPORT_MESSAGE_BYTES;

export interface ConsumerSettings {
  readonly consumer: string;
  readonly ackWaitSeconds: number;
  readonly maxAckPending: number;
}

/** Not wire: the durable consumer of a homeserver's report stream, and of its outbox. */
export const REPORT_CONSUMER = "reports";
export const OUTBOX_CONSUMER = "forwarder";

/** The fields a stream spec fixes; all of them are compared and all are sent on repair. */
export type StreamSpecConfig = Pick<StreamConfig,
  | "name" | "subjects" | "retention" | "storage" | "num_replicas" | "duplicate_window" | "max_msgs_per_subject" | "discard"
  | "discard_new_per_subject" | "max_msg_size" | "max_age" | "max_bytes" | "max_msgs" | "max_consumers" | "sealed"
  | "deny_delete" | "deny_purge" | "allow_rollup_hdrs" | "allow_direct" | "mirror_direct"
> & {
  /** Must be absent: a copy of every event to a subject of someone else's choosing, or other streams' messages mixed in. */
  readonly republish?: undefined;
  readonly sources?: undefined;
  readonly mirror?: undefined;
  readonly subject_transform?: undefined;
};

export type ConsumerSpecConfig = Pick<ConsumerConfig,
  | "durable_name" | "ack_policy" | "deliver_policy" | "ack_wait" | "max_ack_pending" | "max_deliver" | "replay_policy" | "inactive_threshold"
  | "max_waiting" | "max_expires"
> & {
  /** A pull consumer: no push delivery elsewhere. */
  readonly deliver_subject?: undefined;
  /** The whole stream (absent), or one sender's subject of an inbox. */
  readonly filter_subject?: string | undefined;
  readonly filter_subjects?: undefined;
};

export interface StreamSpec {
  readonly stream: StreamSpecConfig;
  readonly consumers: readonly ConsumerSpecConfig[];
  /**
   * No other consumer may exist on the stream but those listed and those this
   * accepts: in a work-queue stream any other consumer takes messages away from
   * ours. Enforced where the stream is managed.
   */
  readonly exclusive?: (consumer: { readonly name: string; readonly filter?: string | undefined }) => boolean;
}

function baseStream(name: string, subject: string, replicas: number): StreamSpecConfig {
  return {
    name,
    subjects: [subject],
    storage: StorageType.File,
    // Each message is consumed once by its consumer, then it lives in Postgres.
    retention: RetentionPolicy.Workqueue,
    num_replicas: replicas,
    duplicate_window: nanos(120_000),
    max_msgs_per_subject: -1,
    discard: DiscardPolicy.Old,
    discard_new_per_subject: false,
    max_msg_size: -1,
    max_age: 0,
    max_bytes: -1,
    max_msgs: -1,
    max_consumers: -1,
    sealed: false,
    deny_delete: false,
    deny_purge: false,
    allow_rollup_hdrs: false,
    allow_direct: false,
    mirror_direct: false,
    republish: undefined,
    sources: undefined,
    mirror: undefined,
    subject_transform: undefined,
  };
}

/** Pulls waiting on one consumer at once: a pull per worker process, with room to spare. */
const MAX_WAITING_PULLS = 64;

function pullConsumer(name: string, ackWaitSeconds: number, maxAckPending: number): ConsumerSpecConfig {
  return {
    durable_name: name,
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.All,
    ack_wait: nanos(ackWaitSeconds * 1000),
    max_ack_pending: maxAckPending,
    // Never give up on a message: transient failures are retried until they pass,
    // permanent ones are terminated explicitly with their reason.
    max_deliver: -1,
    replay_policy: ReplayPolicy.Instant,
    // A worker keeps one pull waiting per consumer; a holder of the pull right (on a hub, the
    // homeserver itself) could otherwise park 512 pulls for an hour, each with a heartbeat
    // every millisecond (measured by an outside review: ~200,000 messages/s from one burst).
    max_waiting: MAX_WAITING_PULLS,
    max_expires: nanos(60_000),
    deliver_subject: undefined,
    filter_subject: undefined,
    filter_subjects: undefined,
    inactive_threshold: undefined,
  };
}

/**
 * The inbox consumer of one sender (not wire), by the sender's subject token:
 * `<base>_<token>`, or, for a token that is no homeserver name (or too long
 * for a consumer name), `<base>_H<hash>`: upper case, which no homeserver
 * token holds, so the two forms never meet.
 */
export function inboxConsumerName(base: string, senderToken: string): string {
  const plain = `${base}_${senderToken}`;
  if (homeserverFromToken(senderToken) !== undefined && plain.length <= 200) return plain;
  return `${base}_H${createHash("sha256").update(senderToken).digest("hex").slice(0, 40)}`;
}

/** The inbox subject of a sender's token, as the stream stores it. */
export function inboxSubjectOfToken(destination: string, senderToken: string): string {
  return `${inboxWildcard(destination).slice(0, -1)}${senderToken}`;
}

/**
 * The destination's inbox, and one durable pull consumer for each sender,
 * filtered to its subject, which the workers serve in turn (issue 15): one
 * sender's backlog waits behind itself, never in front of another sender's
 * events. `senders` are subject tokens (src/protocol/names.ts, subjectToken).
 */
export function inboxSpec(
  homeserver: string, s: InboxSettings, c: ConsumerSettings, senders: readonly string[], unlisted: readonly string[] = [],
): StreamSpec {
  const consumerOf = (token: string): ConsumerSpecConfig => ({
    ...pullConsumer(inboxConsumerName(c.consumer, token), c.ackWaitSeconds, c.maxAckPending),
    filter_subject: inboxSubjectOfToken(homeserver, token),
  });
  const prefix = inboxSubjectOfToken(homeserver, "");
  return {
    stream: {
      ...baseStream(inboxStreamName(homeserver), inboxWildcard(homeserver), s.replicas),
      duplicate_window: nanos(s.duplicateWindowSeconds * 1000),
      // One subject per sender: this is the per-sender backlog quota. Discard-new
      // per subject refuses a flooding sender's publish instead of dropping others' events.
      max_msgs_per_subject: s.maxMessagesPerSender,
      discard: DiscardPolicy.New,
      discard_new_per_subject: true,
      // The JWS plus NATS headers; larger never passes verification anyway.
      max_msg_size: s.maxMessageBytes + 4096,
      max_bytes: s.maxBytes,
    },
    consumers: [
      ...[...new Set(senders)].sort().map(consumerOf),
      // A sender not configured is served while its events wait; the server removes its
      // consumer once no worker has pulled from it for this long.
      ...[...new Set(unlisted)].filter((t) => !senders.includes(t)).sort().map((token) => ({ ...consumerOf(token), inactive_threshold: nanos(UNLISTED_IDLE_MS) })),
    ],
    // Another worker may serve a sender this one does not know of yet: a consumer that is
    // exactly what inboxSpec makes for some sender stays; anything else goes.
    exclusive: ({ name, filter }) =>
      filter !== undefined && filter.startsWith(prefix) && name === inboxConsumerName(c.consumer, filter.slice(prefix.length)),
  };
}

/** How long an unlisted sender's consumer outlives the last pull from it. */
const UNLISTED_IDLE_MS = 5 * 60_000;

/** The sender's stream for reports about its events, and the consumer that records them. */
export function reportSpec(homeserver: string, replicas: number): StreamSpec {
  return {
    stream: {
      ...baseStream(reportStreamName(homeserver), reportWildcard(homeserver), replicas),
      // Reports are proof for the sender; a week covers any outage of ours.
      max_age: nanos(7 * 24 * 3600 * 1000),
      max_msg_size: REPORT_MESSAGE_BYTES,
      max_msgs_per_subject: REPORTS_PER_DESTINATION,
      discard: DiscardPolicy.New,
      discard_new_per_subject: true,
      max_bytes: REPORT_STREAM_BYTES,
    },
    consumers: [pullConsumer(REPORT_CONSUMER, 30, 1000)],
  };
}

/**
 * The sender's outbox, on the server it connects to: signed events wait here
 * until the forwarder has them acknowledged by their destination's inbox.
 */
export function outboxSpec(homeserver: string, s: { maxMessageBytes: number }): StreamSpec {
  return {
    stream: {
      ...baseStream(outboxStreamName(homeserver), outboxWildcard(homeserver), 1),
      max_msg_size: s.maxMessageBytes + 4096,
    },
    // Each forwarder holds up to a few batches; the rest wait in the stream.
    consumers: [pullConsumer(OUTBOX_CONSUMER, 30, 2000)],
  };
}

function same(a: unknown, b: unknown): boolean {
  if (Array.isArray(a) || Array.isArray(b)) {
    return Array.isArray(a) && Array.isArray(b) && a.length === b.length && [...a].sort().join("\u0000") === [...b].sort().join("\u0000");
  }
  // A server omits what is empty or off: an absent list is no list, an absent flag is false.
  const empty = (v: unknown): boolean => v === undefined || v === null || v === false || (typeof v === "object" && Object.keys(v).length === 0);
  if (empty(a) && empty(b)) return true;
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Each field of `desired` that `actual` does not match, as `field: actual (expected desired)`. Pure. */
export function drift(actual: object, desired: object): string[] {
  const out: string[] = [];
  for (const [key, want] of Object.entries(desired)) {
    const have = (actual as Record<string, unknown>)[key];
    if (!same(have, want)) out.push(`${key}: ${JSON.stringify(have) ?? "absent"} (expected ${JSON.stringify(want) ?? "absent"})`);
  }
  return out;
}

export type SpecCheck =
  | { readonly ok: true; readonly repaired: readonly string[] }
  /** `missing`: a stream or consumer is not there at all, so nothing can run on it. */
  | { readonly ok: false; readonly problem: string; readonly missing: boolean; readonly repaired: readonly string[] };

function isApiError(err: unknown, code?: number): err is JetStreamApiError {
  return err instanceof JetStreamApiError && (code === undefined || err.code === code);
}

function describe(err: unknown): string {
  const message = (err as Error).message;
  return /permission/i.test(message) ? `not allowed (${message})` : message;
}

/** No answer at all (the server or the way to the hub is down): says nothing about the streams. */
function isUnreachable(err: unknown): boolean {
  return /no responders|timeout|timed out|disconnect|closed|connection/i.test((err as Error).message) && !/permission/i.test((err as Error).message);
}

/** Thrown by ensureSpec when NATS gave no answer: the caller keeps what it knew. */
export class StreamsUnreachable extends Error {
  override readonly name = "StreamsUnreachable";
}

/**
 * Makes the stream and its consumers what `spec` says, when `manage`; otherwise
 * only compares. Never deletes a stream: a field the server cannot change in place
 * (retention, storage) is reported, since recreating would drop its messages. A
 * consumer that cannot be changed in place is recreated: in a work-queue stream
 * its messages wait for the new one.
 */
export async function ensureSpec(jsm: JetStreamManager, spec: StreamSpec, manage: boolean): Promise<SpecCheck> {
  const repaired: string[] = [];
  const name = spec.stream.name;
  const fail = (problem: string, missing = false): SpecCheck => ({ ok: false, problem, missing, repaired });
  const unreachable = (err: unknown): boolean => {
    if (isUnreachable(err)) throw new StreamsUnreachable(`${name}: ${(err as Error).message}`, { cause: err });
    return false;
  };
  let actual: StreamConfig | undefined;
  try {
    actual = (await jsm.streams.info(name)).config;
  } catch (err) {
    if (!isApiError(err, JetStreamApiCodes.StreamNotFound) && !unreachable(err)) return fail(`stream ${name}: ${describe(err)}`);
  }
  if (actual === undefined) {
    if (!manage) return fail(`stream ${name} is missing (this relay does not manage its streams: the hub operator runs fedrelay nats-provision)`, true);
    try {
      await jsm.streams.add(spec.stream);
      repaired.push(`created stream ${name}`);
    } catch (err) {
      return fail(`stream ${name} is missing and could not be created: ${describe(err)}`, true);
    }
  } else {
    const differences = drift(actual, spec.stream);
    if (differences.length > 0) {
      if (!manage) return fail(`stream ${name} differs: ${differences.join("; ")}`);
      try {
        await jsm.streams.update(name, spec.stream);
        repaired.push(`restored stream ${name} (${differences.join("; ")})`);
      } catch (err) {
        return fail(`stream ${name} differs (${differences.join("; ")}) and could not be restored: ${describe(err)}`);
      }
    }
  }
  if (spec.exclusive && manage) {
    // First: an unfiltered consumer (an older relay's) forbids the filtered ones on a work queue.
    const wanted = new Set(spec.consumers.map((c) => c.durable_name));
    try {
      for await (const other of jsm.consumers.list(name)) {
        if (wanted.has(other.name) || spec.exclusive({ name: other.name, filter: other.config.filter_subject })) continue;
        await jsm.consumers.delete(name, other.name);
        repaired.push(`deleted consumer ${name}/${other.name} (not ours: it would take our messages)`);
      }
    } catch (err) {
      if (!unreachable(err)) return fail(`consumers of ${name} could not be listed or removed: ${describe(err)}`);
    }
  }
  for (const consumer of spec.consumers) {
    const durable = consumer.durable_name!;
    let have: ConsumerConfig | undefined;
    try {
      have = (await jsm.consumers.info(name, durable)).config;
    } catch (err) {
      if (!isApiError(err, JetStreamApiCodes.ConsumerNotFound) && !unreachable(err)) return fail(`consumer ${name}/${durable}: ${describe(err)}`);
    }
    const differences = have === undefined ? [] : drift(have, consumer);
    if (have !== undefined && differences.length === 0) continue;
    const what = have === undefined ? "is missing" : `differs: ${differences.join("; ")}`;
    if (!manage) return fail(`consumer ${name}/${durable} ${what} (this relay does not manage its consumers: the hub operator runs fedrelay nats-provision)`, have === undefined);
    try {
      if (have !== undefined) {
        try {
          await jsm.consumers.update(name, durable, consumer);
        } catch {
          await jsm.consumers.delete(name, durable);
          await jsm.consumers.add(name, consumer);
        }
      } else {
        await jsm.consumers.add(name, consumer);
      }
      repaired.push(`${have === undefined ? "created" : "restored"} consumer ${name}/${durable}${have === undefined ? "" : ` (${differences.join("; ")})`}`);
    } catch (err) {
      return fail(`consumer ${name}/${durable} ${what} and could not be put right: ${describe(err)}`, have === undefined);
    }
  }
  return { ok: true, repaired };
}

/** With every right (the relay's own server, tests, benchmarks): a spec that cannot be met throws. */
export async function ensureOrThrow(jsm: JetStreamManager, spec: StreamSpec): Promise<void> {
  const check = await ensureSpec(jsm, spec, true);
  if (!check.ok) throw new Error(check.problem);
}

export function ensureInbox(jsm: JetStreamManager, homeserver: string, inbox: InboxSettings, consumer: ConsumerSettings, senders: readonly string[]): Promise<void> {
  return ensureOrThrow(jsm, inboxSpec(homeserver, inbox, consumer, senders));
}

export function ensureReportStream(jsm: JetStreamManager, homeserver: string, replicas: number): Promise<void> {
  return ensureOrThrow(jsm, reportSpec(homeserver, replicas));
}
