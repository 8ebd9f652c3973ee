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

/** Headers, subject and reply of a delivered message, on top of its data (a pull's max_bytes counts them). */
const MESSAGE_OVERHEAD = 1024;

export async function startBatchLoop(
  consumer: Consumer,
  options: BatchLoopOptions,
  handle: (batch: JsMsg[]) => Promise<void>,
): Promise<BatchLoop> {
  const maxBatchBytes = options.maxBatchBytes ?? Infinity;
  // Two batches: one being processed, the next already here.
  const room = { messages: options.batchSize * 2, bytes: maxBatchBytes * 2 };
  const queue: JsMsg[] = [];
  let queuedBytes = 0;
  let stopping = false;
  let failure: unknown;
  let pull: ConsumerMessages | undefined;
  let notify: (() => void) | undefined;
  let resume: (() => void) | undefined;
  const signal = (): void => { notify?.(); notify = undefined; };
  const wake = (): void => { resume?.(); resume = undefined; };
  const pause = (ms?: number): Promise<void> => new Promise<void>((r) => {
    resume = r;
    if (ms !== undefined) setTimeout(wake, ms).unref();
  });

  const receiving = (async () => {
    try {
      while (!stopping) {
        const messages = room.messages - queue.length;
        const bytes = room.bytes - queuedBytes;
        if (messages <= 0 || bytes <= 0) {
          await pause();
          continue;
        }
        let delivered = 0;
        try {
          // By bytes, nats.js asks for at most 100 messages a pull; under load they follow one another.
          pull = await consumer.fetch(Number.isFinite(bytes) && options.pullByBytes !== false
            ? { max_bytes: Math.max(bytes, (options.maxMessageBytes ?? 0) + MESSAGE_OVERHEAD), expires: options.expiresMs }
            : { max_messages: messages, expires: options.expiresMs });
          if (stopping) break;
          for await (const m of pull) {
            delivered += 1;
            queue.push(m);
            queuedBytes += m.data.byteLength;
            options.onBuffered?.(m);
            signal();
          }
        } catch (err) {
          if (stopping) break;
          if (isServedPull(err, delivered)) continue;
          options.onPullError?.(err);
          await pause(options.retryMs ?? 1000);
        }
      }
    } finally {
      await pull?.close();
      signal();
    }
  })();

  const inFlight = options.inFlight ?? 2;
  const overlapAfter = options.overlapAfter ?? 1;
  const running = new Set<Promise<void>>();
  const processing = (async () => {
    while (!stopping) {
      if (queue.length === 0) {
        // Pulling ends only when stopping, which ends this loop too.
        await new Promise<void>((r) => (notify = r));
        continue;
      }
      if (running.size >= inFlight) {
        await Promise.race(running);
        continue;
      }
      if (running.size > 0 && queue.length < overlapAfter) {
        // Until a batch finishes or more arrive.
        await Promise.race([...running, new Promise<void>((r) => (notify = r))]);
        continue;
      }
      await new Promise<void>((r) => setImmediate(r));
      const batch = queue.splice(0, batchLength(queue, options.batchSize, maxBatchBytes));
      for (const m of batch) queuedBytes -= m.data.byteLength;
      wake();
      // A handler must settle each message itself; one that throws ends the loop (and `done` rejects).
      const job: Promise<void> = handle(batch)
        .catch((err: unknown) => { failure ??= err; stopping = true; signal(); wake(); void pull?.close(); })
        .finally(() => running.delete(job));
      running.add(job);
    }
    // Shutdown and the end of the stream both wait for the batches in hand.
    await Promise.allSettled(running);
  })();

  const done = (async () => {
    await processing;
    await receiving;
    // Delivered to us but never processed: give it back now rather than after ack_wait.
    for (const m of queue.splice(0)) m.nak();
    if (failure !== undefined) throw failure;
  })();

  return {
    done,
    async stop() {
      stopping = true;
      signal();
      wake();
      await pull?.close();
      await done;
    },
  };
}
