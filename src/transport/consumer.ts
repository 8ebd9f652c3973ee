/**
 * The pull loop shared by all worker processes: it takes what JetStream has
 * buffered, up to `batchSize`, and hands it over as one batch. It never waits
 * to fill a batch, so a lone event is processed at once, and under load batches
 * grow by themselves (the next pull is already buffered while one commits).
 */
import type { Consumer, JsMsg } from "@nats-io/jetstream";

export interface BatchLoopOptions {
  readonly batchSize: number;
  readonly expiresMs: number;
}

export interface BatchLoop {
  /** Settles when the loop has ended, with the error that ended it, if any. */
  readonly done: Promise<void>;
  /** Stops pulling, lets the batch in hand finish, releases what was buffered. */
  stop(): Promise<void>;
}

export async function startBatchLoop(
  consumer: Consumer,
  options: BatchLoopOptions,
  handle: (batch: JsMsg[]) => Promise<void>,
): Promise<BatchLoop> {
  // Twice the batch: one being processed, the next already on its way.
  const messages = await consumer.consume({ max_messages: options.batchSize * 2, expires: options.expiresMs });
  let stopping = false;
  const done = (async () => {
    let batch: JsMsg[] = [];
    for await (const m of messages) {
      if (stopping) {
        // Buffered but never processed: give it back now rather than after ack_wait.
        m.nak();
        continue;
      }
      batch.push(m);
      if (batch.length >= options.batchSize || messages.getPending() === 0) {
        const ready = batch;
        batch = [];
        await handle(ready);
      }
    }
    for (const m of batch) m.nak();
  })();
  return {
    done,
    async stop() {
      stopping = true;
      await messages.close();
      await done;
    },
  };
}
