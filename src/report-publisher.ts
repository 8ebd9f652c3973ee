/**
 * The destination's side of delivery reports (DESIGN §8): the commit that
 * decides an event queues its report (migrations/010), and this loop, one per
 * worker, publishes them. A batch is acknowledged when it commits; a peer whose
 * report stream is slow, full or absent delays its own reports and nothing else.
 *
 * What one peer can cost is bounded: at most `maxInFlightPerPeer` of its
 * reports are being published at once (each waits at most publishTimeoutMs), a
 * peer whose publish fails is left alone for 1, 2, 4 … maxBackoffSeconds, and
 * its queue keeps at most `maxQueuedPerPeer` reports, none older than
 * `maxAgeSeconds`. Every worker takes part: claims are leased rows, so a worker
 * that dies leaves its claims to the others when the lease runs out.
 */
import type { JetStreamClient } from "@nats-io/jetstream";
import type { Logger } from "pino";
import type { RelayConfig } from "./config.ts";
import type { RelayMetrics } from "./metrics.ts";
import type { SigningKey } from "./protocol/keys.ts";
import { reportClaims } from "./protocol/report.ts";
import { signReport } from "./protocol/sign.ts";
import { reportSubject } from "./protocol/subjects.ts";
import { storedDecisions, type ReportItem } from "./reports.ts";
import type { Db } from "./store/db.ts";
import { claimReports, forgetReports, putOffPeer, queuedReportsBySender, trimReportQueue } from "./store/report-queue.ts";
import { publishEvent } from "./transport/publisher.ts";

export interface ReportPublisher {
  /** Reports were queued: look now rather than at the next poll. */
  wake(): void;
  /** Stops claiming, waits for the publishes in flight, and records what they sent. */
  stop(): Promise<void>;
}

export interface ReportPublisherDeps {
  readonly self: string;
  readonly db: Db;
  readonly js: JetStreamClient;
  /** The key that signs now (a rotation changes it without a restart). */
  readonly signingKey: () => SigningKey;
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  /** Seconds since the epoch: the reports' iat. */
  readonly now: () => number;
  readonly publishTimeoutMs: number;
  readonly limits: RelayConfig["reports"];
  /** Reports queued by other workers (or due again) are looked for this often. */
  readonly pollMs?: number;
  /** The bounded label a peer's metrics carry (src/metrics.ts, peerLabeller). */
  readonly peerLabel: (peer: string) => string;
}

/** The queue is trimmed, and its depth measured, this often. */
const TRIM_MS = 15_000;

export function startReportPublisher(deps: ReportPublisherDeps): ReportPublisher {
  const { db, log, metrics, limits } = deps;
  const pollMs = deps.pollMs ?? 1000;
  // A claim outlives its publish (publishTimeoutMs) with room to record the result.
  const leaseSeconds = Math.ceil(deps.publishTimeoutMs / 1000) * 2 + 5;
  const inFlight = new Map<string, number>();
  let total = 0;
  /** Consecutive failures, and until when (ms) a peer is left alone. */
  const failing = new Map<string, { failures: number; untilMs: number }>();
  let sent: { iss: string; jti: string }[] = [];
  const publishes = new Set<Promise<void>>();
  let running = true;
  let woken = false;
  let wakeUp: (() => void) | undefined;
  let trimmedAt = 0;

  const wake = (): void => {
    woken = true;
    wakeUp?.();
  };

  async function publish(item: ReportItem): Promise<boolean> {
    try {
      const claims = reportClaims({ destination: deps.self, sender: item.sender, ref: item.ref, accepted: item.accepted, refused: item.refused, now: deps.now() });
      const token = await signReport(claims, deps.signingKey());
      await publishEvent(deps.js, reportSubject(item.sender, deps.self), Buffer.from(token, "latin1"), deps.publishTimeoutMs);
      return true;
    } catch (err) {
      // No report stream, a full one, a stalled one: the events are stored regardless.
      log.debug({ sender: item.sender, ref: item.ref, err: (err as Error).message }, "report not delivered");
      return false;
    }
  }

  function start(item: ReportItem): void {
    const peer = item.sender;
    inFlight.set(peer, (inFlight.get(peer) ?? 0) + 1);
    total += 1;
    const done = publish(item).then(async (ok) => {
      const left = inFlight.get(peer)! - 1;
      if (left === 0) inFlight.delete(peer);
      else inFlight.set(peer, left);
      total -= 1;
      if (ok) {
        sent.push({ iss: item.sender, jti: item.ref });
        failing.delete(peer);
        metrics.reportsSent.inc({ peer: deps.peerLabel(peer) });
      } else {
        metrics.reportFailures.inc({ peer: deps.peerLabel(peer) });
        await backOff(peer);
      }
      wake();
    });
    publishes.add(done);
    void done.finally(() => publishes.delete(done));
  }

  /** The first failure of a wave puts the peer's whole queue off; the rest of the wave fails alike. */
  async function backOff(peer: string): Promise<void> {
    const nowMs = Date.now();
    const state = failing.get(peer);
    if (state && nowMs < state.untilMs) return;
    const failures = (state?.failures ?? 0) + 1;
    const delaySeconds = Math.min(limits.maxBackoffSeconds, 2 ** (failures - 1));
    failing.set(peer, { failures, untilMs: nowMs + delaySeconds * 1000 });
    log.warn({ peer, failures, retryInSeconds: delaySeconds }, "delivery reports to this peer are failing; backing off");
    try {
      await putOffPeer(db, peer, delaySeconds);
    } catch (err) {
      // Its rows come back when their lease ends; the in-memory back-off still holds for this worker.
      log.warn({ err, peer }, "could not put off a peer's reports");
    }
  }

  async function round(): Promise<void> {
    if (sent.length > 0) {
      const done = sent;
      sent = [];
      try {
        await forgetReports(db, done);
      } catch (err) {
        // Sent again after their lease: a report twice is harmless (the sender keeps the first).
        log.warn({ err }, "could not forget sent reports");
      }
    }
    if (Date.now() - trimmedAt >= TRIM_MS) {
      trimmedAt = Date.now();
      const dropped = await trimReportQueue(db, { maxAgeSeconds: limits.maxAgeSeconds, maxPerPeer: limits.maxQueuedPerPeer });
      if (dropped > 0) log.warn({ dropped }, "delivery reports dropped: queued too long, or past a peer's queue limit");
      metrics.reportQueueDepth.reset();
      for (const [peer, n] of await queuedReportsBySender(db)) metrics.reportQueueDepth.inc({ peer: deps.peerLabel(peer) }, n);
    }
    const free = limits.maxInFlight - total;
    if (!running || free <= 0) return;
    const nowMs = Date.now();
    const skip: string[] = [];
    const room = new Map<string, number>();
    for (const [peer, state] of failing) if (nowMs < state.untilMs) skip.push(peer);
    for (const [peer, n] of inFlight) {
      if (n >= limits.maxInFlightPerPeer) skip.push(peer);
      else room.set(peer, limits.maxInFlightPerPeer - n);
    }
    const claimed = await claimReports(db, { limit: free, perPeer: limits.maxInFlightPerPeer, room, skip, leaseSeconds });
    if (claimed.length === 0) return;
    const items = await storedDecisions(db, claimed);
    const found = new Set(items.map((i) => `${i.sender}\n${i.ref}`));
    // An event no longer stored (pruned) has nothing to report.
    sent.push(...claimed.filter((c) => !found.has(`${c.iss}\n${c.jti}`)));
    for (const item of items) start(item);
    // A full claim: more may be due at once.
    if (claimed.length === free) woken = true;
  }

  const loop = (async () => {
    while (running) {
      woken = false;
      try {
        await round();
      } catch (err) {
        log.warn({ err }, "report round failed; trying again");
      }
      if (!running) break;
      if (!woken) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, pollMs);
          wakeUp = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        wakeUp = undefined;
      }
    }
  })();

  return {
    wake,
    async stop() {
      running = false;
      wake();
      await loop;
      await Promise.all([...publishes]);
      if (sent.length > 0) await forgetReports(db, sent).catch((err: unknown) => log.warn({ err }, "could not forget sent reports"));
    },
  };
}
