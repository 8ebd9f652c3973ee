/**
 * The pull loop shared by all worker processes: it takes what JetStream has
 * delivered, up to `batchSize`, and hands it over as one batch. It never waits
 * to fill a batch, so a lone event is processed at once (or, with `overlapAfter`,
 * once the batch in flight has committed), and under load batches grow by
 * themselves (the next pulls arrive while one batch commits).
 *
 * What a worker holds is bounded: it pulls only while its buffer is under two
 * batches, by count and by bytes. (consume() would not do: it asks for more as
 * messages arrive, not as they are processed, so a slow worker buffers until
 * the consumer's max_ack_pending, thousands of events, out of reach of the
 * other workers.) A pull asks for what fits in the buffer's room by bytes, at
 * least one message of the largest size the stream takes, so it never stalls.
 *
 * "What has been delivered" is everything that arrived before the next
 * macrotask: the iterator yields buffered messages in microtasks, so one
 * setImmediate after the first message lets the rest of the burst in.
 */
import type { Consumer, ConsumerMessages, JsMsg } from "@nats-io/jetstream";

export interface BatchLoopOptions {
  readonly batchSize: number;
  readonly expiresMs: number;
  /**
   * Batches handled at once. Two keep the CPU busy: one batch verifies while
   * the previous one waits on its commit (measured: with one, a worker sat idle
   * a quarter of the time).
   */
  readonly inFlight?: number;
  /**
   * While a batch is in flight, the next starts only once this many messages
   * wait (default 1). Under load the queue is always that long, and batches
   * overlap as before; at a moderate rate a trickle waits for the batch in
   * flight and goes in one larger batch rather than a second small one, which
   * costs less per event (a transaction, a WAL flush, row locks contended).
   */
  readonly overlapAfter?: number;
  /**
   * A batch also ends at this many bytes of message data: 200 events of 1,000
   * recipients are 12 MB of tokens and ten times that once parsed, so large
   * events come in smaller batches (measured: peak RSS ~280 MB without it).
   */
  readonly maxBatchBytes?: number;
  /** The largest message the stream accepts: every pull can carry one. */
  readonly maxMessageBytes?: number;
  /** Bound pulls by bytes (default when maxBatchBytes is set); see pullsByBytes. */
  readonly pullByBytes?: boolean;
  /**
   * Told of each message as it is buffered, before it joins a batch: the
   * handler may start on it while earlier batches commit (the receiver
   * verifies ahead). Messages buffered at stop are given back, never handled.
   */
  readonly onBuffered?: (m: JsMsg) => void;
  /** Told of a pull that failed (NATS unreachable, the consumer missing); the loop pulls again after `retryMs`. */
  readonly onPullError?: (err: unknown) => void;
  readonly retryMs?: number;
}

export interface BatchLoop {
  /** Settles when the loop has ended. */
  readonly done: Promise<void>;
  /** Stops pulling, lets the batch in hand finish, gives back what was buffered. */
  stop(): Promise<void>;
}

/** How many of the queued messages make the next batch: at least one, at most `size`, within `maxBytes`. */
export function batchLength(queue: readonly { readonly data: Uint8Array }[], size: number, maxBytes: number): number {
  let bytes = 0;
  let n = 0;
  while (n < queue.length && n < size) {
    bytes += queue[n]!.data.byteLength;
    if (n > 0 && bytes > maxBytes) break;
    n += 1;
  }
  return n;
}

/**
 * Whether a nats-server ends a pull bounded by bytes as soon as it is served.
 * Measured: 2.9 does not, and the pull stalls until heartbeats are missed (1.5 s
 * every 100 messages); 2.10 ends it with a 409. Older servers are pulled by count.
 */
export function pullsByBytes(serverVersion: string | undefined): boolean {
  const [major, minor] = (serverVersion ?? "").split(".").map(Number);
  return major !== undefined && minor !== undefined && (major > 2 || (major === 2 && minor >= 10));
}

/**
 * How the server ends a pull bounded by bytes once it is served: at its message
 * count ("batch completed") or at a message that would not fit in the bytes
 * left. nats.js surfaces both 409s from fetch() as errors, though nothing went
 * wrong, unless nothing at all was delivered (a message larger than the pull).
 */
function isServedPull(err: unknown, delivered: number): boolean {
  if ((err as { code?: unknown } | null)?.code !== 409) return false;
  const message = (err as Error).message;
  return /batch completed/i.test(message) || (delivered > 0 && /exceeds maxbytes/i.test(message));
}

/** At most this many messages waiting make a source light (a trickle), served before the backlogs. */
const LIGHT_QUEUE = 32;
/** A backlog's batch size beside other active sources (below). */
const SHARED_BACKLOG_BATCH = 32;

/** Headers, subject and reply of a delivered message, on top of its data (a pull's max_bytes counts them). */
const MESSAGE_OVERHEAD = 1024;

export interface FairBatchLoop extends BatchLoop {
  /** Starts pulling from `consumer`, served in turn with the others; a key already there is kept. */
  add(key: string, consumer: Consumer): void;
  /** Stops pulling from it and gives back what it had buffered; its batches in hand finish. */
  remove(key: string): Promise<void>;
  /** The keys served now. */
  keys(): string[];
}

/** One consumer's pulls and buffer. */
interface Source {
  readonly key: string;
  readonly consumer: Consumer;
  readonly queue: JsMsg[];
  bytes: number;
  /** Its last pull brought something: it counts among those sharing the buffer. */
  busy: boolean;
  /** The consumer's messages not yet delivered, as of the last one buffered (the server's count in its ack subject). */
  pending: number;
  stopping: boolean;
  pull?: ConsumerMessages;
  resume?: () => void;
  receiving?: Promise<void>;
}

/**
 * One worker's loop over several consumers (an inbox's senders, issue 15): each
 * consumer is pulled on its own, and each batch takes from their buffers in
 * turn, one message each round, so a consumer with a backlog fills only its
 * share of a batch. The two batches a worker may buffer are shared by the
 * consumers that have messages, each holding at least one message of the
 * largest size.
 *
 * Beside a backlog (a consumer with more than LIGHT_QUEUE messages waiting, buffered or still in the stream), a
 * trickle does not wait for the backlog's batches: while light consumers have
 * messages, the next batch holds only theirs, and one such batch may start
 * beside the batches in hand; and the backlog has one batch in hand rather than
 * `inFlight` while others are active, leaving them CPU. Measured with
 * `npm run chaos -- --scenarios g` (an honest peer at 150 events/s beside
 * 50,000 queued events of another): honest p99 315 ms and p50 105 ms with turns
 * alone; ~100–150 ms and 20–30 ms with these, the machine's two cores busy
 * draining the backlog.
 */
export function startFairBatchLoop(options: BatchLoopOptions, handle: (batch: JsMsg[]) => Promise<void>): FairBatchLoop {
  const maxBatchBytes = options.maxBatchBytes ?? Infinity;
  const room = { messages: options.batchSize * 2, bytes: maxBatchBytes * 2 };
  const sources = new Map<string, Source>();
  let order: Source[] = [];
  let turn = 0;
  let queued = 0;
  let stopping = false;
  let failure: unknown;
  let notify: (() => void) | undefined;
  const signal = (): void => { notify?.(); notify = undefined; };
  const wake = (s: Source): void => { s.resume?.(); s.resume = undefined; };
  const pause = (s: Source, ms?: number): Promise<void> => new Promise<void>((r) => {
    s.resume = r;
    if (ms !== undefined) setTimeout(() => wake(s), ms).unref();
  });

  /** A source's share of the buffer: the whole of it when it alone has messages. */
  const shareOf = (s: Source): { messages: number; bytes: number } => {
    let sharing = 0;
    for (const o of order) if (o === s || o.busy || o.queue.length > 0) sharing += 1;
    return { messages: Math.max(1, Math.floor(room.messages / sharing)), bytes: room.bytes / sharing };
  };

  async function receive(s: Source): Promise<void> {
    try {
      while (!stopping && !s.stopping) {
        const share = shareOf(s);
        const messages = share.messages - s.queue.length;
        const bytes = share.bytes - s.bytes;
        if (messages <= 0 || bytes <= 0) {
          await pause(s);
          continue;
        }
        let delivered = 0;
        try {
          // By bytes, nats.js asks for at most 100 messages a pull; under load they follow one another.
          s.pull = await s.consumer.fetch(Number.isFinite(bytes) && options.pullByBytes !== false
            ? { max_bytes: Math.max(bytes, (options.maxMessageBytes ?? 0) + MESSAGE_OVERHEAD), expires: options.expiresMs }
            : { max_messages: messages, expires: options.expiresMs });
          if (stopping || s.stopping) break;
          for await (const m of s.pull) {
            delivered += 1;
            s.queue.push(m);
            s.bytes += m.data.byteLength;
            s.pending = m.info.pending;
            queued += 1;
            options.onBuffered?.(m);
            signal();
          }
        } catch (err) {
          if (stopping || s.stopping) break;
          if (isServedPull(err, delivered)) continue;
          options.onPullError?.(err);
          await pause(s, options.retryMs ?? 1000);
        } finally {
          s.busy = delivered > 0;
        }
      }
    } finally {
      await s.pull?.close();
      signal();
    }
  }

  // Light or a backlog by what waits for the source in all, buffered and still in the stream: its
  // buffer alone is capped by its share, so among a few busy senders every backlog would look light
  // (and a source that filled its buffer before the others came would wait until all of them drained).
  /** A source with a few messages waiting: a trickle, not a backlog. */
  const isLight = (s: Source): boolean => s.queue.length > 0 && s.queue.length + s.pending <= LIGHT_QUEUE;
  /** Light sources are served first only beside a backlog: alone, a trickle batches as before. */
  const isBacklog = (s: Source): boolean => s.queue.length > 0 && s.queue.length + s.pending > LIGHT_QUEUE;

  /**
   * The next batch: one message from each source in turn, the first source
   * changing each batch; only the light sources' when `lightOnly`.
   */
  function takeBatch(lightOnly: boolean, size: number): JsMsg[] {
    const batch: JsMsg[] = [];
    let bytes = 0;
    const from = lightOnly ? order.filter(isLight) : order;
    const start = turn++ % from.length;
    const taken = new Set<Source>();
    fill: while (batch.length < size) {
      let progressed = false;
      for (let i = 0; i < from.length; i++) {
        const s = from[(start + i) % from.length]!;
        const m = s.queue[0];
        if (m === undefined) continue;
        if (batch.length > 0 && bytes + m.data.byteLength > maxBatchBytes) break fill;
        s.queue.shift();
        s.bytes -= m.data.byteLength;
        queued -= 1;
        bytes += m.data.byteLength;
        batch.push(m);
        taken.add(s);
        progressed = true;
        if (batch.length >= size) break fill;
      }
      if (!progressed) break;
    }
    for (const s of taken) wake(s);
    // A source that shrank its share makes room for the others' pulls.
    for (const s of order) if (!taken.has(s)) wake(s);
    return batch;
  }

  const inFlight = options.inFlight ?? 2;
  const overlapAfter = options.overlapAfter ?? 1;
  /** Batches in hand, each marked light (only light sources' messages) or not. */
  const running = new Map<Promise<void>, boolean>();
  const untilSomethingChanges = (): Promise<unknown> => Promise.race([...running.keys(), new Promise<void>((r) => (notify = r))]);
  const processing = (async () => {
    while (!stopping) {
      if (queued === 0) {
        await new Promise<void>((r) => (notify = r));
        continue;
      }
      // A trickle never waits behind a backlog: while light sources have messages beside a
      // source with a backlog, the next batch holds only theirs (small, so it commits quickly),
      // and one such batch may run beside the `inFlight` batches in hand. Measured (npm run chaos, g): an honest peer at
      // 150 events/s beside a 50,000-event backlog, p99 315 ms without this.
      const light = order.some(isLight) && order.some(isBacklog);
      const regular = [...running.values()].filter((l) => !l).length;
      const express = running.size - regular;
      // Beside other active sources, a backlog has one batch in hand, not `inFlight`: the
      // CPU it leaves is what keeps their batches quick.
      const shared = order.filter((o) => o.busy || o.queue.length > 0).length > 1 && order.some(isBacklog);
      const limit = shared ? 1 : inFlight;
      if (running.size >= limit && !(light && express === 0)) {
        await untilSomethingChanges();
        continue;
      }
      if (running.size > 0 && queued < overlapAfter && !(light && regular > 0)) {
        // Until a batch finishes or more arrive: a trickle goes in one larger batch rather than many small ones.
        await untilSomethingChanges();
        continue;
      }
      await new Promise<void>((r) => setImmediate(r));
      if (queued === 0) continue;
      const lightOnly = order.some(isLight) && order.some(isBacklog);
      // Beside others, a backlog's batch is small too: the client rows it locks, which the others'
      // batches may need, are held for a short commit. Measured (npm run chaos, g, two runs each):
      // the honest peer's p99 84–85 → 49–53 ms and p50 14–15 → 6 ms; the backlog then drains at
      // ~3,500 events/s instead of ~5,000 while others are active.
      const batch = takeBatch(lightOnly, shared && !lightOnly ? Math.min(options.batchSize, SHARED_BACKLOG_BATCH) : options.batchSize);
      // A handler must settle each message itself; one that throws ends the loop (and `done` rejects).
      const job: Promise<void> = handle(batch)
        .catch((err: unknown) => { failure ??= err; stopAll(); })
        .finally(() => running.delete(job));
      running.set(job, lightOnly);
    }
    // Shutdown and the end of the stream both wait for the batches in hand.
    await Promise.allSettled(running.keys());
  })();

  /** Delivered to us but never processed: given back now rather than after ack_wait. */
  const giveBack = (s: Source): void => {
    queued -= s.queue.length;
    s.bytes = 0;
    for (const m of s.queue.splice(0)) m.nak();
  };

  function stopAll(): void {
    stopping = true;
    signal();
    for (const s of order) {
      wake(s);
      void s.pull?.close();
    }
  }

  const done = (async () => {
    await processing;
    await Promise.all(order.map((s) => s.receiving));
    for (const s of order) giveBack(s);
    if (failure !== undefined) throw failure;
  })();

  return {
    done,
    add(key, consumer) {
      if (stopping || sources.has(key)) return;
      const s: Source = { key, consumer, queue: [], bytes: 0, busy: false, pending: 0, stopping: false };
      sources.set(key, s);
      order = [...sources.values()];
      s.receiving = receive(s);
    },
    async remove(key) {
      const s = sources.get(key);
      if (!s) return;
      s.stopping = true;
      wake(s);
      await s.pull?.close();
      await s.receiving;
      sources.delete(key);
      order = [...sources.values()];
      giveBack(s);
    },
    keys: () => [...sources.keys()],
    async stop() {
      stopAll();
      await done;
    },
  };
}

/** One consumer's loop (a report stream, an outbox): the fair loop with a single source. */
export async function startBatchLoop(
  consumer: Consumer,
  options: BatchLoopOptions,
  handle: (batch: JsMsg[]) => Promise<void>,
): Promise<BatchLoop> {
  const loop = startFairBatchLoop(options, handle);
  loop.add("", consumer);
  return loop;
}
