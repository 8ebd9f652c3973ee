/** Row types of migrations/*.sql, for kysely. */
import type { ColumnType } from "kysely";

type Timestamp = ColumnType<Date, Date | string | undefined, Date | string>;
/** pg returns bigint as string; cursors fit in a double for ~285 years at 1M/s. */
type BigIntColumn = ColumnType<string, number | bigint | string, number | bigint | string>;
type GeneratedBigInt = ColumnType<string, number | bigint | string | undefined, number | bigint | string>;

export interface ClientsTable {
  id: string;
  delivery_seq: GeneratedBigInt;
  acked_seq: GeneratedBigInt;
  created_at: Timestamp;
  /** The client's rate buckets (src/receive/plan.ts): "*" for all senders, else per sender. */
  buckets: ColumnType<Record<string, [number, number]>, string | undefined, string>;
  /** Drawn at registration and when its tokens are revoked; every client token carries it (migration 009). */
  registration: ColumnType<string, string | undefined, string>;
}

export interface ClientTokenKeysTable {
  id: string;
  secret: Buffer;
  created_at: Timestamp;
  retired_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  revoked_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export interface PeerKeysTable {
  thumbprint: string;
  kid: string;
  homeserver: string;
  jwk: ColumnType<unknown, string, string>;
  first_seen: Timestamp;
  last_seen: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  retired_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  revoked_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
  rebound: ColumnType<boolean, boolean | undefined, boolean>;
}

export interface OwnKeysTable {
  kid: string;
  private_jwk: ColumnType<unknown, string, string>;
  created_at: Timestamp;
  sign_from: Timestamp;
  retired_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export interface EventsTable {
  iss: string;
  jti: string;
  grp: string;
  issued_at: Timestamp;
  expires_at: Timestamp;
  /** Null for an event none of whose recipients was accepted: its record below instead (migration 011). */
  token: string | null;
  key_thumbprint: string;
  stream_seq: BigIntColumn | null;
  received_at: Timestamp;
  token_sha256: Buffer | null;
  token_bytes: number | null;
  /** [cid, reason] pairs in the event's recipient order. */
  refused: ColumnType<[string, string][] | null, string | null | undefined, string | null>;
}

export interface DeliveriesTable {
  client_id: string;
  seq: BigIntColumn;
  iss: string;
  jti: string;
}

export interface RecipientRefusalsTable {
  iss: string;
  jti: string;
  client_id: string;
  reason: string;
  at: Timestamp;
}

export interface RefusedEventsTable {
  stream_seq: BigIntColumn;
  subject: string;
  reason: string;
  detail: string;
  claimed_iss: string | null;
  claimed_jti: string | null;
  sample: string;
  at: Timestamp;
}

export interface Database {
  clients: ClientsTable;
  client_token_keys: ClientTokenKeysTable;
  peer_keys: PeerKeysTable;
  own_keys: OwnKeysTable;
  events: EventsTable;
  deliveries: DeliveriesTable;
  recipient_refusals: RecipientRefusalsTable;
  /** A view: recipient_refusals and the refusals of events kept as records (migration 011). */
  all_recipient_refusals: RecipientRefusalsTable;
  refused_events: RefusedEventsTable;
  capabilities: CapabilitiesTable;
  client_blocks: ClientBlocksTable;
  server_rules: ServerRulesTable;
  server_policy: ServerPolicyTable;
  reports: ReportsTable;
  report_queue: ReportQueueTable;
  rate_buckets: RateBucketsTable;
  rate_overrides: RateOverridesTable;
}

export interface CapabilitiesTable {
  id: string;
  hash: Buffer;
  client_id: string;
  grp: string;
  owner: string;
  created_at: Timestamp;
  revoked_at: ColumnType<Date | null, Date | string | null | undefined, Date | string | null>;
}

export interface ClientBlocksTable {
  client_id: string;
  kind: "server" | "group";
  target: string;
  created_at: Timestamp;
}

export interface ServerRulesTable {
  pattern: string;
  action: "allow" | "deny";
  created_at: Timestamp;
}

export interface ServerPolicyTable {
  singleton: ColumnType<boolean, boolean | undefined, boolean>;
  mode: "open" | "allowlist";
  updated_at: Timestamp;
}

export interface ReportsTable {
  destination: string;
  ref: string;
  jti: string;
  accepted: ColumnType<string[], string, string>;
  refused: ColumnType<{ cid: string; reason: string }[], string, string>;
  token: string;
  received_at: Timestamp;
}

export interface ReportQueueTable {
  iss: string;
  jti: string;
  queued_at: Timestamp;
  attempts: ColumnType<number, number | undefined, number>;
  due_at: Timestamp;
}

export interface RateBucketsTable {
  key: string;
  tokens: number;
  updated_at: number;
}

export interface RateOverridesTable {
  scope: "server" | "client";
  subject: string;
  rate: number;
  burst: number;
  updated_at: Timestamp;
}
