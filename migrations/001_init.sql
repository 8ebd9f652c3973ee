-- fedrelay schema v1. Runs with search_path set to the homeserver's schema.

-- Local clients of this homeserver. `delivery_seq` is the last cursor handed out:
-- bumping it under the row lock in the commit transaction makes every client's
-- cursors follow commit order, so a reader never skips a late-committing row.
CREATE TABLE clients (
  id            text PRIMARY KEY,
  delivery_seq  bigint NOT NULL DEFAULT 0,
  acked_seq     bigint NOT NULL DEFAULT 0,
  created_at    timestamptz NOT NULL DEFAULT now(),
  CHECK (acked_seq <= delivery_seq)
);

-- Every key that verified a stored event, by RFC 7638 thumbprint: never deleted,
-- so a stored event can always be re-verified (non-repudiation).
CREATE TABLE peer_keys (
  thumbprint  text PRIMARY KEY,
  kid         text NOT NULL,
  homeserver  text NOT NULL,
  jwk         jsonb NOT NULL,
  first_seen  timestamptz NOT NULL DEFAULT now()
);

-- Verified events, once each: (iss, jti) is the authoritative dedupe (DESIGN §4).
CREATE TABLE events (
  iss             text NOT NULL,
  jti             text NOT NULL,
  grp             text NOT NULL,
  issued_at       timestamptz NOT NULL,
  expires_at      timestamptz NOT NULL,
  token           text NOT NULL,
  key_thumbprint  text NOT NULL REFERENCES peer_keys (thumbprint),
  stream_seq      bigint,
  received_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (iss, jti)
);

-- One row per accepted recipient, until the client acknowledges it.
CREATE TABLE deliveries (
  client_id  text NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
  seq        bigint NOT NULL,
  iss        text NOT NULL,
  jti        text NOT NULL,
  PRIMARY KEY (client_id, seq),
  UNIQUE (client_id, iss, jti),
  FOREIGN KEY (iss, jti) REFERENCES events (iss, jti)
);

-- Refused recipients of accepted events, for the audit trail and reports.
CREATE TABLE recipient_refusals (
  iss        text NOT NULL,
  jti        text NOT NULL,
  client_id  text NOT NULL,
  reason     text NOT NULL,
  at         timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (iss, jti, client_id),
  FOREIGN KEY (iss, jti) REFERENCES events (iss, jti)
);

-- Refused events. Never keyed on the claimed (iss, jti): a forgery that reuses a
-- genuine jti must not make the genuine event a duplicate (DESIGN §5 step 6).
-- Keyed on the stream sequence instead, so a redelivered refusal is recorded once.
CREATE TABLE refused_events (
  stream_seq   bigint PRIMARY KEY,
  subject      text NOT NULL,
  reason       text NOT NULL,
  detail       text NOT NULL,
  claimed_iss  text,
  claimed_jti  text,
  -- The first 4 KiB of what arrived: enough to investigate, bounded under a flood.
  sample       text NOT NULL,
  at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refused_events_at ON refused_events (at);
