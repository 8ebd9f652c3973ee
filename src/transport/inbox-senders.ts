/**
 * Which senders' consumers a worker serves (issue 15, per-peer fairness). Each
 * sender has a consumer of its own on the inbox (src/transport/streams.ts,
 * inboxSpec), and the worker's fair loop takes from them in turn.
 *
 * The configured peers (and this homeserver) are always served. A sender that
 * is not configured can publish only where nobody checks who publishes (one
 * shared account, a test's server): its events would be refused, but must not
 * sit in the inbox for ever, so a sender found with events waiting is served
 * too, up to `maxUnlisted` of them: where this relay manages its streams it
 * creates the sender's consumer, which the server removes once the workers
 * have stopped pulling from it (inactive_threshold); on a hub, where the
 * operator provisions a consumer for every member, it uses that one. On a hub, only members can publish,
 * and the hub's operator provisions a consumer for each (fedrelay nats-provision).
 *
 * The same look at the inbox gives each peer's backlog (fedrelay_peer_backlog_events).
 */
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import type { Logger } from "pino";
import type { RelayMetrics } from "../metrics.ts";
import { homeserverFromToken } from "../protocol/names.ts";
import { inboxStreamName, inboxWildcard } from "../protocol/subjects.ts";
import type { FairBatchLoop } from "./consumer.ts";
import { inboxConsumerName } from "./streams.ts";

export interface InboxSendersDeps {
  readonly homeserver: string;
  readonly jsm: JetStreamManager;
  readonly js: JetStreamClient;
  /** worker.consumer: the base of each sender's consumer name. */
  readonly consumerBase: string;
  /** Subject tokens of the senders always served. */
  readonly configured: readonly string[];
  /** Whether this relay creates consumers (nats.manageStreams). */
  readonly manage: boolean;
  readonly maxUnlisted: number;
  readonly loop: FairBatchLoop;
  readonly log: Logger;
  readonly metrics: RelayMetrics;
  readonly peerLabel: (peer: string | undefined) => string;
}

export interface InboxSenders {
  /** Subject tokens of the senders not configured served now (their consumers are in the inbox's spec). */
  unlisted(): readonly string[];
  /** Looks at the inbox, then serves whom it should (after `check` has made their consumers). */
  refresh(check: () => Promise<void>): Promise<void>;
}

export function inboxSenders(deps: InboxSendersDeps): InboxSenders {
  const stream = inboxStreamName(deps.homeserver);
  const configured = new Set(deps.configured);
  let unlisted: readonly string[] = [];

  async function backlogBySender(): Promise<Map<string, number>> {
    const info = await deps.jsm.streams.info(stream, { subjects_filter: inboxWildcard(deps.homeserver) });
    const counts = new Map<string, number>();
    for (const [subject, n] of Object.entries(info.state.subjects ?? {})) {
      const token = subject.split(".")[4];
      if (token !== undefined && n > 0) counts.set(token, n);
    }
    return counts;
  }

  return {
    unlisted: () => unlisted,
    async refresh(check) {
      const backlog = await backlogBySender();
      deps.metrics.peerBacklog.reset();
      for (const token of configured) deps.metrics.peerBacklog.set({ peer: deps.peerLabel(homeserverFromToken(token)) }, 0);
      for (const [token, n] of backlog) deps.metrics.peerBacklog.inc({ peer: deps.peerLabel(homeserverFromToken(token)) }, n);

      const waiting = [...backlog].filter(([token]) => !configured.has(token)).sort((a, b) => b[1] - a[1]).slice(0, deps.maxUnlisted).map(([token]) => token);
      if (waiting.length > 0) deps.log.info({ senders: waiting.slice(0, 10), count: waiting.length }, "events waiting from senders not configured: serving them");
      // Where a hub provisions consumers, one for a member this relay does not know is served if it is there.
      unlisted = deps.manage ? waiting : [];
      const wanted = new Set([...configured, ...waiting]);
      for (const token of deps.loop.keys()) if (!wanted.has(token)) await deps.loop.remove(token);
      await check();
      for (const token of wanted) {
        if (deps.loop.keys().includes(token)) continue;
        try {
          deps.loop.add(token, await deps.js.consumers.get(stream, inboxConsumerName(deps.consumerBase, token)));
        } catch (err) {
          // Missing on a hub that has not provisioned it yet: /readyz says so (the stream watch).
          deps.log.warn({ err: (err as Error).message, sender: token }, "no consumer for a sender yet");
        }
      }
    },
  };
}
