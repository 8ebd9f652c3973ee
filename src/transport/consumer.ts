/**
 * The pull loop shared by all worker processes: it takes what JetStream has
 * delivered, up to `batchSize`, and hands it over as one batch. It never waits
 * to fill a batch, so a lone event is processed at once, and under load batches
 * grow by themselves (the next pull is already buffered while one commits).
 *
 * "What has been delivered" is everything that arrived before the next
 * macrotask: the iterator yields buffered messages in microtasks, so one
 * setImmediate after the first message lets the rest of the burst in. (The
 * iterator's getPending() over-counts after internal callbacks and stalls a
 * batch until ack_wait: measured here, 30 s stalls with two workers.)
 */
import type { Consumer, JsMsg } from "@nats-io/jetstream";

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
   * A batch also ends at this many bytes of message data: 200 events of 1,000
   * recipients are 12 MB of tokens and ten times that once parsed, so large
   * events come in smaller batches (measured: peak RSS ~280 MB without it).
   */
  readonly maxBatchBytes?: number;
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

export async function startBatchLoop(
  consumer: Consumer,
  options: BatchLoopOptions,
  handle: (batch: JsMsg[]) => Promise<void>,
): Promise<BatchLoop> {
  // Twice the batch: one being processed, the next already on its way.
  const messages = await consumer.consume({ max_messages: options.batchSize * 2, expires: options.expiresMs });
  const queue: JsMsg[] = [];
  let stopping = false;
  let ended = false;
  let failure: unknown;
  let notify: (() => void) | undefined;
  let resume: (() => void) | undefined;
  const signal = (): void => { notify?.(); notify = undefined; };

  const receiving = (async () => {
    try {
      for await (const m of messages) {
        queue.push(m);
        signal();
        // Backpressure: stop taking from the iterator, so JetStream stops sending.
        if (queue.length >= options.batchSize * 2 && !stopping) await new Promise<void>((r) => (resume = r));
      }
    } finally {
      ended = true;
      signal();
    }
  })();

  const inFlight = options.inFlight ?? 2;
  const running = new Set<Promise<void>>();
  const processing = (async () => {
    while (!stopping) {
      if (queue.length === 0) {
        if (ended) break;
        await new Promise<void>((r) => (notify = r));
        continue;
      }
      if (running.size >= inFlight) {
        await Promise.race(running);
        continue;
      }
      await new Promise<void>((r) => setImmediate(r));
      const batch = queue.splice(0, batchLength(queue, options.batchSize, options.maxBatchBytes ?? Infinity));
      resume?.();
      resume = undefined;
      // A handler must settle each message itself; one that throws ends the loop (and `done` rejects).
      const job: Promise<void> = handle(batch)
        .catch((err: unknown) => { failure ??= err; stopping = true; signal(); })
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
      resume?.();
      await messages.close();
      await done;
    },
  };
}
