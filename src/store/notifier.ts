/**
 * Wakes long-polling clients when a commit delivers to them. One LISTEN
 * connection per process; the commit sends the delivered client ids (or `*`).
 * If the connection drops, waiters simply time out and re-query: a missed
 * notification costs latency, never a message.
 */
import type pg from "pg";
import type { Db } from "./db.ts";

export interface DeliveryNotifier {
  /** Resolves when `clientId` may have new messages, or after `ms`. Register before querying to never miss one. */
  waiter(clientId: string, ms: number): { readonly promise: Promise<void>; cancel(): void };
  /** After close, waiters resolve at once: a long-poll answers with what it has. */
  readonly closed: boolean;
  close(): Promise<void>;
}

export async function createDeliveryNotifier(db: Db): Promise<DeliveryNotifier> {
  const waiters = new Map<string, Set<() => void>>();
  let conn: pg.PoolClient | undefined;
  let closed = false;

  const wake = (payload: string | undefined): void => {
    const ids = payload === undefined || payload === "*" ? [...waiters.keys()] : payload.split("\n");
    for (const id of ids) for (const resolve of waiters.get(id) ?? []) resolve();
  };

  const listen = async (): Promise<void> => {
    if (closed) return;
    try {
      const client = await db.pool.connect();
      client.on("notification", (n) => wake(n.payload));
      client.on("error", () => {
        client.release(true);
        conn = undefined;
        wake("*");
        setTimeout(() => void listen(), 1000).unref();
      });
      await client.query(`LISTEN "${db.schema}"`);
      conn = client;
    } catch {
      setTimeout(() => void listen(), 1000).unref();
    }
  };
  await listen();

  return {
    waiter(clientId, ms) {
      let done!: () => void;
      const promise = new Promise<void>((resolve) => (done = resolve));
      const set = waiters.get(clientId) ?? new Set();
      waiters.set(clientId, set);
      const timer = setTimeout(() => cancel(), closed ? 0 : ms);
      const cancel = (): void => {
        clearTimeout(timer);
        set.delete(done);
        if (set.size === 0 && waiters.get(clientId) === set) waiters.delete(clientId);
        done();
      };
      set.add(done);
      return { promise: promise.then(() => cancel()), cancel };
    },
    get closed() {
      return closed;
    },
    async close() {
      if (closed) return;
      closed = true;
      wake("*");
      if (conn) {
        const c = conn;
        conn = undefined;
        await c.query(`UNLISTEN "${db.schema}"`).catch(() => undefined);
        c.release();
      }
    },
  };
}
