-- This homeserver's own signing keys (issue 17): `fedrelay keys rotate` adds one
-- that every process serves in its key set within a second and signs with from
-- sign_from on, so peers can fetch it before it is used; the key it replaces is
-- served from then on with an `exp` (retired_at), forever, so the events it
-- signed stay provable. The key in the configuration (keys.signingKey) is the
-- first row. The private key is here so that every process, on any host, signs
-- with the same current key without a restart: whoever reads this table can
-- sign as this homeserver (docs/operations.md, "Rotating this homeserver's key").
CREATE TABLE own_keys (
  kid         text PRIMARY KEY,
  private_jwk jsonb NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  -- The key signs from then on, until a later key's sign_from passes.
  sign_from   timestamptz NOT NULL,
  -- Served as the key's `exp`: set once, by the rotation that replaces it.
  retired_at  timestamptz
);
