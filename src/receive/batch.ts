/**
 * The receive path for one batch: transport hands bytes to protocol, protocol
 * hands claims to policy and store, the store's commit releases the acks.
 */
import type { JsMsg } from "@nats-io/jetstream";
import type { Logger } from "pino";
import { dispositionOf } from "../errors.ts";
import type { RateLimits } from "../policy/rate-limit.ts";
import type { RelayMetrics } from "../metrics.ts";
import type { EventLimits } from "../protocol/claims.ts";
import { senderOfInboxSubject } from "../protocol/subjects.ts";
import { verifyEvent, type KeyResolver, type Verdict, type VerifiedEvent } from "../protocol/verify.ts";
import type { Db } from "../store/db.ts";
import { commitBatch } from "./commit.ts";
import { isTransient } from "./failures.ts";
import type { AcceptedInput, CommitFaults, EventOutcome, RefusedInput } from "./types.ts";

export interface ReceiverDeps {
  readonly self: string;
  readonly db: Db;
  readonly keys: KeyResolver;
  readonly limits: EventLimits;
  readonly metrics: RelayMetrics;
  readonly log: Logger;
  /** Seconds since the epoch: rate limits. (Events are verified as of when their inbox stored them.) */
  readonly now: () => number;
  readonly isSenderAllowed?: (iss: string) => boolean;
  /** How long JetStream waits before redelivering a batch that failed for a transient reason. */
  readonly retryDelayMs: number;
  /**
   * Delivery reports (DESIGN §8): the commit queues them and this is told once
   * it has (src/report-publisher.ts). Absent: no reports are queued.
   */
  readonly reports?: { readonly queued: () => void };
  /** The `peer` label of per-peer metrics (src/metrics.ts, peerLabeller); default: every peer "other". */
  readonly peerLabel?: (peer: string | undefined) => string;
  /** At most this many bytes of messages are verified ahead of their batch (default: no limit). */
  readonly maxVerifyAheadBytes?: number;
  /** The limits in force now (config plus run-time overrides); absent: no rate limiting. */
  readonly rateLimits?: () => RateLimits;
  /** Tests and chaos only: faults to inject (src/receive/types.ts, CommitFaults). */
  readonly faults?: CommitFaults;
}

/** A delayed event is looked at again at least this often, so a refilled bucket is noticed. */
const MAX_DELAY_MS = 30_000;

const SAMPLE_BYTES = 4096;

/**
 * Verification is synchronous CPU work (~65 µs an event): every this many events
 * it yields to the event loop, so the batches in flight, which hold row locks
 * until their next statement is sent, are not kept waiting.
 */
const VERIFY_SLICE = 32;

/** What arrived, readable and safe to store in a text column (no NUL, no raw control bytes). */
export function sampleOf(data: Uint8Array): string {
  const head = Buffer.from(data.buffer, data.byteOffset, Math.min(data.byteLength, SAMPLE_BYTES)).toString("latin1");
  // eslint-disable-next-line no-control-regex
  return head.replace(/[\u0000-\u001f\u007f-\u00ff]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
}

/** An accepted event of a batch; when it was published is read from the message only if asked. */
class AcceptedMessage implements AcceptedInput {
  readonly streamSeq: number;
  readonly event: VerifiedEvent;
  readonly #m: JsMsg;
  constructor(m: JsMsg, event: VerifiedEvent) {
    this.streamSeq = m.seq;
    this.event = event;
    this.#m = m;
  }

  // Asked only for an event over its sender's limit: parsing m.info costs on every event.
  get publishedAt(): number {
    return this.#m.info.timestampNanos / 1e9;
  }
}

export type BatchResult = {
  readonly outcomes: readonly EventOutcome[];
  readonly refused: readonly RefusedInput[];
};

export interface Receiver {
  /**
   * Starts verifying a message that will come in a later batch. A buffered
   * message waits for a batch slot while earlier batches commit; verified by
   * then, its batch begins its transaction at once (measured: the slowest 1 %
   * of events spent ~22 ms verifying their batch after the wait).
   */
  verifyAhead(m: JsMsg): void;
  processBatch(batch: JsMsg[]): Promise<BatchResult | undefined>;
}

export function createReceiver(deps: ReceiverDeps): Receiver {
  const allowAll = (): boolean => true;
  const { metrics } = deps;
  const peerLabel = deps.peerLabel ?? ((): string => "other");
  /** A message's sender, as its subject names it: who NATS let publish it. */
  const peerOf = (m: JsMsg): string => peerLabel(senderOfInboxSubject(m.subject));

  function verify(m: JsMsg): Promise<Verdict> {
    return verifyEvent(m.data, m.subject, {
      self: deps.self,
      limits: deps.limits,
      keys: deps.keys,
      isSenderAllowed: deps.isSenderAllowed ?? allowAll,
      // Judged as of when this homeserver's inbox stored the event (docs/protocol.md §5 step 5),
      // not when a worker got to it: a backlog, or an outage of ours or of the way to us, never
      // turns an event that arrived valid into an expired one.
      now: m.info.timestampNanos / 1e9,
    }).catch((err: unknown): Verdict => {
      // A bug in verification must refuse one message, never poison its batch with retries.
      deps.log.error({ err, seq: m.seq }, "verification threw; refusing the event as malformed");
      return { ok: false, reason: "malformed", detail: "verification failed" };
    });
  }

  // Each message's verdict, started ahead or by its batch, whichever comes first; weakly held,
  // so a message done with (or given back at shutdown) takes its verdict with it.
  const verdicts = new WeakMap<JsMsg, Promise<Verdict>>();
  const waiting: JsMsg[] = [];
  let scheduled = false;
  const verdictOf = (m: JsMsg): Promise<Verdict> => {
    let verdict = verdicts.get(m);
    if (!verdict) verdicts.set(m, (verdict = verify(m)));
    return verdict;
  };
  // Bytes of messages verified ahead and not yet taken by a batch: their parsed claims are held
  // until then (measured: 1,000-recipient events held this way took a worker to 215 MB).
  const aheadBytes = { held: 0, limit: deps.maxVerifyAheadBytes ?? Infinity };
  const heldAhead = new WeakSet<JsMsg>();
  const verifySlice = (): void => {
    for (const m of waiting.splice(0, VERIFY_SLICE)) {
      // Past the limit a message is left to its batch (a batch verifies what is not verified yet).
      if (verdicts.has(m) || aheadBytes.held + m.data.byteLength > aheadBytes.limit) continue;
      aheadBytes.held += m.data.byteLength;
      heldAhead.add(m);
      verdictOf(m);
    }
    scheduled = waiting.length > 0;
    if (scheduled) setImmediate(verifySlice);
  };

  return {
    verifyAhead(m) {
      waiting.push(m);
      if (!scheduled) {
        scheduled = true;
        setImmediate(verifySlice);
      }
    },

    async processBatch(batch) {
      const now = deps.now();
      const accepted: AcceptedInput[] = [];
      const refused: RefusedInput[] = [];
      const refusedMsgs: JsMsg[] = [];
      const acceptedMsgs = new Map<number, JsMsg>();
      const deferred: [JsMsg, number][] = [];
      const received = new Map<string, number>();
      for (const m of batch) received.set(peerOf(m), (received.get(peerOf(m)) ?? 0) + 1);
      for (const [peer, n] of received) metrics.eventsReceived.inc({ peer }, n);
      try {
        let unverified = 0;
        for (const m of batch) {
          if (heldAhead.delete(m)) aheadBytes.held -= m.data.byteLength;
          // Those not verified ahead yet are verified here, still yielding every slice.
          else if (!verdicts.has(m) && ++unverified % VERIFY_SLICE === 0) await new Promise<void>((resolve) => setImmediate(resolve));
          const verdict = await verdictOf(m);
          if (verdict.ok) {
            const input = new AcceptedMessage(m, verdict.event);
            accepted.push(input);
            acceptedMsgs.set(m.seq, m);
          } else if (verdict.deferred) {
            // Its key is not known yet (the peer's key set is being fetched): only this message
            // waits, in JetStream; the batch goes on. Nothing of it is stored meanwhile.
            deferred.push([m, verdict.retryMs]);
          } else {
            refused.push({ streamSeq: m.seq, subject: m.subject, reason: verdict.reason, detail: verdict.detail, claimed: verdict.claimed, sample: sampleOf(m.data) });
            refusedMsgs.push(m);
          }
        }
        // Wall-clock time, not the injectable clock: this is for operators watching the workers keep up.
        metrics.batchAgeSeconds.observe(Math.max(0, Date.now() / 1000 - batch[0]!.info.timestampNanos / 1e9));
        const outcomes = await settle(accepted, refused, now);
        for (const [m, retryMs] of deferred) {
          m.nak(Math.min(retryMs, MAX_DELAY_MS));
          metrics.eventsDeferred.inc({ peer: peerOf(m) });
        }
        return { outcomes, refused };
      } catch (err) {
        // Transient (Postgres down, a timeout): nothing was committed, so nothing
        // is acknowledged; every message comes back after the delay.
        metrics.batchFailures.inc();
        deps.log.error({ err, size: batch.length }, "batch failed; will be redelivered");
        for (const m of batch) m.nak(deps.retryDelayMs);
        return undefined;
      }

      /**
       * Commits a part of the batch and settles its messages. A failure that is
       * not transient (src/receive/failures.ts) is the batch's own: the part is
       * split in two and each half committed on its own, until the message that
       * fails stands alone; it is recorded as `unprocessable` and terminated,
       * and every other message commits once. A transient failure throws: the
       * messages not yet settled go back to JetStream.
       */
      async function settle(acc: readonly AcceptedInput[], ref: readonly RefusedInput[], at: number): Promise<EventOutcome[]> {
        let outcomes: EventOutcome[];
        const stop = metrics.batchCommitSeconds.startTimer();
        try {
          outcomes = await commitBatch(deps.db, acc, ref, {
            now: at, rateLimits: deps.rateLimits?.(), onBucketRace: () => metrics.bucketRaces.inc(),
            queueReports: deps.reports !== undefined, ...(deps.faults ? { faults: deps.faults } : {}),
          });
        } catch (err) {
          if (isTransient(err)) throw err;
          if (acc.length + ref.length > 1) {
            deps.log.warn({ err, size: acc.length + ref.length }, "a commit failed, not transiently: splitting the batch to find the message");
            const half = Math.ceil((acc.length + ref.length) / 2);
            const first = await settle(acc.slice(0, half), ref.slice(0, Math.max(0, half - acc.length)), at);
            return [...first, ...(await settle(acc.slice(half), ref.slice(Math.max(0, half - acc.length)), at))];
          }
          if (acc[0]) await refuseUnprocessable(acceptedMsgs.get(acc[0].streamSeq)!, err, { iss: acc[0].event.claims.iss, jti: acc[0].event.claims.jti });
          else await refuseUnprocessable(refusedMsgs[refused.indexOf(ref[0]!)]!, err, ref[0]!.claimed);
          return [];
        } finally {
          stop();
        }

        // Committed: now, and only now, the acks. Counters move once a commit, not once an event.
        deps.reports?.queued();
        const counts = new PeerCounts();
        // The oldest of each peer's events in this part: how far behind its events are committed.
        const oldest = new Map<string, JsMsg>();
        for (const o of outcomes) {
          const m = acceptedMsgs.get(o.streamSeq)!;
          const peer = peerOf(m);
          if (!oldest.has(peer)) oldest.set(peer, m);
          if (o.status === "delayed") {
            // Over its sender's limit: back to JetStream until the bucket has refilled.
            // Only this message waits; the rest of the batch is committed.
            m.nak(Math.min(Math.max(100, Math.ceil(o.waitSeconds * 1000)), MAX_DELAY_MS));
            counts.add("delayed", peer);
            continue;
          }
          m.ack();
          if (o.status === "duplicate") {
            counts.add("duplicate", peer);
          } else {
            counts.add("stored", peer);
            counts.delivered += o.decision.accepted.length;
            // An event nobody here receives was kept as a record, not with its body (migrations/011).
            counts.stored(peer, o.decision.accepted.length > 0 ? "body" : "record", m.data.length);
            for (const r of o.decision.refused) metrics.recipientsRefused.inc({ reason: r.reason });
          }
        }
        for (const r of ref) {
          const m = refusedMsgs[refused.indexOf(r)]!;
          if (r.reason !== "unprocessable" && dispositionOf(r.reason) === "term") m.term(r.reason);
          else m.ack();
          counts.add(r.reason, peerOf(m));
          deps.log.info({ seq: r.streamSeq, subject: r.subject, reason: r.reason, detail: r.detail, claimed: r.claimed }, "event refused");
        }
        counts.report(metrics);
        const committedAt = Date.now() / 1000;
        for (const [peer, m] of oldest) metrics.peerCommitLagSeconds.observe({ peer }, Math.max(0, committedAt - m.info.timestampNanos / 1e9));
        return outcomes;
      }

      /** The one message a commit fails on, not transiently: recorded for the operator, and never redelivered. */
      async function refuseUnprocessable(m: JsMsg, err: unknown, claimed: RefusedInput["claimed"]): Promise<void> {
        const detail = `its commit failed: ${String((err as Error).message ?? err).slice(0, 200)}`;
        deps.log.error({ err, seq: m.seq, subject: m.subject }, "event unprocessable: recorded and terminated");
        const record: RefusedInput = { streamSeq: m.seq, subject: m.subject, reason: "unprocessable", detail, claimed, sample: sampleOf(m.data) };
        try {
          await commitBatch(deps.db, [], [record], { now: deps.now() });
        } catch (recordErr) {
          if (isTransient(recordErr)) throw recordErr;
          deps.log.error({ err: recordErr, seq: m.seq }, "could not record the unprocessable event; terminating it anyway");
        }
        m.term("unprocessable");
        metrics.eventsRefused.inc({ peer: peerOf(m), reason: "unprocessable" });
      }
    },
  };
}

/** A committed part's counts by peer, moved into the metrics once. */
class PeerCounts {
  delivered = 0;
  readonly #counts = new Map<string, number>();
  readonly #bytes = new Map<string, number>();

  add(outcome: string, peer: string): void {
    const key = `${outcome}\n${peer}`;
    this.#counts.set(key, (this.#counts.get(key) ?? 0) + 1);
  }

  /** A stored event's size, by what of it was kept. */
  stored(peer: string, kept: "body" | "record", bytes: number): void {
    const key = `${kept}\n${peer}`;
    this.#bytes.set(key, (this.#bytes.get(key) ?? 0) + bytes);
  }

  report(metrics: RelayMetrics): void {
    for (const [key, n] of this.#bytes) {
      const [kept, peer] = key.split("\n") as [string, string];
      metrics.peerStoredBytes.inc({ peer, kept }, n);
    }
    for (const [key, n] of this.#counts) {
      const [outcome, peer] = key.split("\n") as [string, string];
      if (outcome === "stored") metrics.eventsAccepted.inc({ peer }, n);
      else if (outcome === "delayed") metrics.eventsDelayed.inc({ peer }, n);
      // duplicate and the refusal reasons
      else metrics.eventsRefused.inc({ peer, reason: outcome }, n);
    }
    if (this.delivered > 0) metrics.deliveriesCommitted.inc(this.delivered);
  }
}
