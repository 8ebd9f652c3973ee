-- Token buckets (spam prevention), charged in the transaction that commits the
-- deliveries. Keys: c:<client>, s:<sender>, sc:<sender>:<client>. Times are the
-- relay's clock in seconds (injectable in tests), not Postgres' now().
CREATE TABLE rate_buckets (
  key         text PRIMARY KEY,
  tokens      double precision NOT NULL,
  updated_at  double precision NOT NULL
);

-- Run-time replacements of the configured limits: a trusted peer, a bot client.
CREATE TABLE rate_overrides (
  scope       text NOT NULL CHECK (scope IN ('server', 'client')),
  subject     text NOT NULL,
  rate        double precision NOT NULL CHECK (rate >= 0),
  burst       double precision NOT NULL CHECK (burst >= 1),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (scope, subject)
);
