/**
 * What operators and backends do through both the CLI and the API, written
 * once. An operation checks its input when it is made, before anything is
 * opened, so a typo fails as bad_request without touching the database (the CLI
 * connects only afterwards); running it against a database does the work and
 * returns what the API answers and the CLI prints.
 */
import { RelayError } from "../errors.ts";
import { isClientId } from "../protocol/names.ts";
import { clientExists } from "../store/clients.ts";
import type { Db } from "../store/db.ts";

export type Operation<T> = (db: Db) => Promise<T>;

export function oneOf<T extends string>(allowed: readonly T[], value: string | undefined, what: string): T {
  if (!allowed.includes(value as T)) throw new RelayError("bad_request", `${what} must be ${allowed.join(" or ")}, got ${JSON.stringify(value ?? "")}`);
  return value as T;
}

export function clientId(value: string | undefined): string {
  if (!isClientId(value)) throw new RelayError("bad_request", `${JSON.stringify(value ?? "")} is not a client id`);
  return value;
}

export async function requireClient(db: Db, id: string): Promise<void> {
  if (!(await clientExists(db, id))) throw new RelayError("not_found", `no client ${id}`);
}
