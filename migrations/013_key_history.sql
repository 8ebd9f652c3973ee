-- Key history (issue 17): peer_keys held only the keys that verified a stored
-- event. It now holds every key a peer's set (or this relay's configuration)
-- ever bound to a kid, before the key is used, so every process of a homeserver,
-- and every restart, agrees on which key a kid names: a kid, once bound, names
-- that key forever (docs/protocol.md §10, Keys). Rows are never deleted.
--
-- last_seen: when the key was last in its peer's set or our configuration.
-- retired_at, revoked_at: when this relay learned the key was retired (its `exp`
-- appeared) or an operator revoked it.
-- rebound: the row came under a kid already bound to another key. Only rows
-- from before this migration can be so (a peer that rebound a kid, or two
-- encodings of one key, which now share one canonical thumbprint); they are
-- kept as the evidence of the events they verified, and bind nothing.
ALTER TABLE peer_keys
  ADD COLUMN last_seen  timestamptz,
  ADD COLUMN retired_at timestamptz,
  ADD COLUMN revoked_at timestamptz,
  ADD COLUMN rebound    boolean NOT NULL DEFAULT false;

UPDATE peer_keys p SET rebound = true
WHERE EXISTS (SELECT 1 FROM peer_keys q WHERE q.kid = p.kid AND (q.first_seen, q.thumbprint) < (p.first_seen, p.thumbprint));

CREATE UNIQUE INDEX peer_keys_one_key_per_kid ON peer_keys (kid) WHERE NOT rebound;
