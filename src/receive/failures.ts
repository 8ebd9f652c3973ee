/**
 * Why a batch's commit failed, decided at the consumer's edge: transient (the
 * same batch will commit later: Postgres restarting, a connection lost, a
 * serialization failure or deadlock) or not (something in the batch itself: a
 * bug meeting an input, a value Postgres refuses). Transient failures are
 * retried whole; the others are split until the message that fails stands
 * alone (src/receive/batch.ts).
 */
import { RETRYABLE_SQLSTATES } from "../store/db.ts";

/**
 * pg's own failures of the connection carry no SQLSTATE, only these messages
 * (node-postgres 8: client.js, pg-pool): the one place a message is matched.
 */
const PG_CONNECTION_FAILURES = [
  "Connection terminated",
  "timeout exceeded when trying to connect",
  "Query read timeout",
  "Client has encountered a connection error and is not queryable",
  "Cannot use a pool after calling end on the pool",
];

export function isTransient(err: unknown): boolean {
  const e = err as { code?: unknown; syscall?: unknown; message?: unknown } | null;
  if (e === null || typeof e !== "object") return false;
  // A SQLSTATE: Postgres says what it was.
  if (typeof e.code === "string" && /^[0-9A-Z]{5}$/.test(e.code)) return RETRYABLE_SQLSTATES.has(e.code);
  // A system call failed (ECONNREFUSED, ECONNRESET, ETIMEDOUT…): the network, not the batch.
  if (typeof e.syscall === "string") return true;
  return typeof e.message === "string" && PG_CONNECTION_FAILURES.some((m) => (e.message as string).includes(m));
}
