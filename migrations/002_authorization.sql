-- Authorization (DESIGN §5 step 7, §6) and delivery reports (§8).

-- Delivery capabilities: only the SHA-256 of the secret is stored, bound to
-- (client, group, owner). Revoked ones are kept, so a late event using one is
-- refused capability_revoked rather than capability_mismatch; so are those of
-- a removed client (no foreign key), so its events are refused unknown_client.
CREATE TABLE capabilities (
  id          text PRIMARY KEY,
  hash        bytea NOT NULL UNIQUE,
  client_id   text NOT NULL,
  grp         text NOT NULL,
  owner       text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  revoked_at  timestamptz
);
CREATE INDEX capabilities_client ON capabilities (client_id);

-- A client's blocks: a whole homeserver, or one group.
CREATE TABLE client_blocks (
  client_id   text NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
  kind        text NOT NULL CHECK (kind IN ('server', 'group')),
  target      text NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (client_id, kind, target)
);

-- Server-level rules set at run time (config holds the static ones).
CREATE TABLE server_rules (
  pattern     text PRIMARY KEY,
  action      text NOT NULL CHECK (action IN ('allow', 'deny')),
  created_at  timestamptz NOT NULL DEFAULT now()
);
-- At most one row: the run-time override of the configured policy mode.
CREATE TABLE server_policy (
  singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  mode        text NOT NULL CHECK (mode IN ('open', 'allowlist')),
  updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Reports received from destinations about our events: the proof of what each accepted.
CREATE TABLE reports (
  destination  text NOT NULL,
  ref          text NOT NULL,
  jti          text NOT NULL,
  accepted     jsonb NOT NULL,
  refused      jsonb NOT NULL,
  token        text NOT NULL,
  received_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (destination, ref)
);
