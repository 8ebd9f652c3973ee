/** Typed instruments on an injected registry (never prom-client's global one). */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";

export interface RelayMetrics {
  readonly registry: Registry;
  readonly eventsReceived: Counter<"peer">;
  readonly eventsAccepted: Counter<"peer">;
  readonly eventsRefused: Counter<"peer" | "reason">;
  readonly deliveriesCommitted: Counter;
  readonly recipientsRefused: Counter<"reason">;
  readonly batchCommitSeconds: Histogram;
  readonly batchAgeSeconds: Histogram;
  readonly batchFailures: Counter;
  readonly bucketRaces: Counter;
  readonly eventsPublished: Counter<"destination">;
  readonly publishFailures: Counter<"destination">;
  readonly reportsSent: Counter<"peer">;
  readonly eventsDelayed: Counter<"peer">;
  readonly eventsDeferred: Counter<"peer">;
  readonly peerKeysRefused: Counter<"peer" | "reason">;
  readonly jwksFetchFailures: Counter<"peer">;
  readonly reportFailures: Counter<"peer">;
  readonly reportQueueDepth: Gauge<"peer">;
  readonly peerBacklog: Gauge<"peer">;
  readonly peerCommitLagSeconds: Histogram<"peer">;
  readonly peerStoredBytes: Counter<"peer" | "kept">;
  readonly refusedPruned: Counter<"table">;
  readonly httpRefused: Counter<"access" | "code">;
  readonly httpWaiting: Gauge;
  readonly httpWaitsRefused: Counter<"limit">;
  readonly streamRepairs: Counter<"stream">;
  readonly outboxForwarded: Counter<"destination">;
  readonly outboxFailures: Counter<"destination">;
  readonly outboxResigned: Counter;
}

export function createMetrics(registry = new Registry(), options: { defaultMetrics?: boolean } = {}): RelayMetrics {
  if (options.defaultMetrics ?? true) collectDefaultMetrics({ register: registry });
  const registers = [registry];
  return {
    registry,
    eventsReceived: new Counter({ name: "fedrelay_events_received_total", help: "Inbox messages taken from JetStream, by sending peer (its subject's)", labelNames: ["peer"], registers }),
    eventsAccepted: new Counter({ name: "fedrelay_events_accepted_total", help: "Events verified and stored (duplicates excluded), by sending peer", labelNames: ["peer"], registers }),
    eventsRefused: new Counter({
      name: "fedrelay_events_refused_total", help: "Events refused, by sending peer (its subject's) and DESIGN §7 reason (duplicate included)", labelNames: ["peer", "reason"], registers,
    }),
    deliveriesCommitted: new Counter({ name: "fedrelay_deliveries_committed_total", help: "Deliveries stored for local clients", registers }),
    recipientsRefused: new Counter({ name: "fedrelay_recipients_refused_total", help: "Recipients refused within accepted events, by reason", labelNames: ["reason"], registers }),
    batchCommitSeconds: new Histogram({
      name: "fedrelay_batch_commit_seconds",
      help: "Duration of one batch's Postgres transaction",
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers,
    }),
    batchAgeSeconds: new Histogram({
      name: "fedrelay_batch_age_seconds",
      help: "Age of a batch's first event, from JetStream storing it to the start of the batch's commit: how far behind the workers run",
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
      registers,
    }),
    batchFailures: new Counter({ name: "fedrelay_batch_failures_total", help: "Batches not committed (transient failure; redelivered)", registers }),
    bucketRaces: new Counter({
      name: "fedrelay_bucket_races_total",
      help: "Batches committed a second time, with the buckets locked, because a client's or sender's bucket was charged concurrently and fell short",
      registers,
    }),
    eventsPublished: new Counter({ name: "fedrelay_events_published_total", help: "Fan-out events acknowledged by JetStream", labelNames: ["destination"], registers }),
    publishFailures: new Counter({ name: "fedrelay_publish_failures_total", help: "Fan-out publishes that failed", labelNames: ["destination"], registers }),
    eventsDelayed: new Counter({
      name: "fedrelay_events_delayed_total", help: "Events sent back for later because their sender was over its rate limit, by sending peer", labelNames: ["peer"], registers,
    }),
    eventsDeferred: new Counter({
      name: "fedrelay_events_deferred_total", help: "Events sent back for later because their key was not known yet (the sending peer's key set was being fetched), by sending peer", labelNames: ["peer"], registers,
    }),
    peerKeysRefused: new Counter({
      name: "fedrelay_peer_keys_refused_total",
      help: "Keys of a peer's key set not taken, by peer and reason (rebound_kid: the peer served a different key under a known kid; see docs/operations.md)",
      labelNames: ["peer", "reason"], registers,
    }),
    jwksFetchFailures: new Counter({ name: "fedrelay_jwks_fetch_failures_total", help: "Fetches of a peer's key set that failed (unreachable, an error status, too large, not a key set), by peer", labelNames: ["peer"], registers }),
    reportsSent: new Counter({ name: "fedrelay_reports_sent_total", help: "Delivery reports published to senders, by peer", labelNames: ["peer"], registers }),
    reportFailures: new Counter({
      name: "fedrelay_report_failures_total", help: "Delivery report publishes that failed (retried with backoff), by peer", labelNames: ["peer"], registers,
    }),
    reportQueueDepth: new Gauge({ name: "fedrelay_report_queue_depth", help: "Delivery reports queued to send, by peer (measured every 15 s)", labelNames: ["peer"], registers }),
    peerBacklog: new Gauge({
      name: "fedrelay_peer_backlog_events", help: "Events in the inbox not yet committed, by sending peer (measured every few seconds)", labelNames: ["peer"], registers,
    }),
    peerCommitLagSeconds: new Histogram({
      name: "fedrelay_peer_commit_lag_seconds",
      help: "From the inbox storing a peer's event to its batch committing (the oldest of the peer's events in each batch), by sending peer",
      labelNames: ["peer"],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
      registers,
    }),
    peerStoredBytes: new Counter({
      name: "fedrelay_peer_stored_bytes_total",
      help: "Bytes of events stored, by sending peer: kept=body for those delivered to someone, kept=record for those nobody received (only a record of them is kept)",
      labelNames: ["peer", "kept"],
      registers,
    }),
    refusedPruned: new Counter({
      name: "fedrelay_refused_pruned_total",
      help: "Past retention.refusedSeconds: records of events nobody received (table=events) and events refused outright (table=refused_events) deleted",
      labelNames: ["table"],
      registers,
    }),
    httpRefused: new Counter({
      name: "fedrelay_http_refused_total",
      help: "API requests refused before their route ran, by the route's access (client, backend, operator) and the error code (unauthorized, too_many_requests)",
      labelNames: ["access", "code"],
      registers,
    }),
    httpWaiting: new Gauge({ name: "fedrelay_http_waiting_requests", help: "Long-polls waiting for messages or reports", registers }),
    httpWaitsRefused: new Counter({
      name: "fedrelay_http_waits_refused_total",
      help: "Long-polls refused 429 because their client (limit=holder) or the process (limit=process) had as many waiting as allowed",
      labelNames: ["limit"],
      registers,
    }),
    streamRepairs: new Counter({
      name: "fedrelay_stream_repairs_total",
      help: "Streams and consumers this process found missing or changed and put back as they should be",
      labelNames: ["stream"],
      registers,
    }),
    outboxForwarded: new Counter({ name: "fedrelay_outbox_forwarded_total", help: "Outboxed events acknowledged by their destination's inbox", labelNames: ["destination"], registers }),
    outboxFailures: new Counter({ name: "fedrelay_outbox_failures_total", help: "Outboxed events not yet accepted by their destination's inbox (retried with backoff)", labelNames: ["destination"], registers }),
    outboxResigned: new Counter({ name: "fedrelay_outbox_resigned_total", help: "Outboxed events signed again (same jti) because their lifetime was running out", registers }),
  };
}

/**
 * The `peer` label of per-peer metrics: a configured peer by name, anyone else
 * (an unknown or forged sender) as "other", so a hostile peer cannot grow the
 * label set.
 */
export function peerLabeller(known: Iterable<string>): (peer: string | undefined) => string {
  const names = new Set(known);
  return (peer) => (peer !== undefined && names.has(peer) ? peer : "other");
}
