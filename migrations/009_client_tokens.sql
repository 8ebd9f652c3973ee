-- Client bearer tokens (HTTP, between this homeserver and its own clients; not wire) are
-- HMAC-SHA256 JWTs under secrets of the relay's own, never under the federation signing
-- key: rotating or retiring one never touches the other.

-- A key signs while neither retired nor revoked (the newest such key). Retired: signs
-- nothing new, and verifies only tokens issued before its retirement, which expire within
-- http.clientTokenTtlSeconds. Revoked (a leaked secret): verifies nothing from then on.
-- Rows are kept, so an operator can see which key a token claimed.
CREATE TABLE client_token_keys (
  id          text PRIMARY KEY,
  secret      bytea NOT NULL CHECK (length(secret) = 32),
  created_at  timestamptz NOT NULL DEFAULT now(),
  retired_at  timestamptz,
  revoked_at  timestamptz
);

-- Every token carries its client's registration: removing a client and registering the
-- id again, or revoking the client's tokens, draws a new one, and every token issued
-- before stops working at once.
ALTER TABLE clients ADD COLUMN registration uuid NOT NULL DEFAULT gen_random_uuid();
