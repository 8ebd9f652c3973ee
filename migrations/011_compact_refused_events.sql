-- A peer's storage is bounded by what this homeserver's clients receive (issue 15).
-- An event none of whose recipients is accepted (unknown clients, no capability,
-- blocked, rate-limited) keeps a compact audit record in its row instead of its
-- body: the token's SHA-256 and size (a token presented later can be matched to
-- it), and every recipient's refusal as [cid, reason] pairs in the event's
-- recipient order, which is what its report and a duplicate's report repeat.
-- The row itself stays: (iss, jti) is the dedupe, and it must outlive the event.
-- Measured (test/integration/storage-bound.test.ts): 1,000 unknown recipients
-- cost ~250 kB an event as token and refusal rows, a few kB as a record.
ALTER TABLE events ALTER COLUMN token DROP NOT NULL;
ALTER TABLE events
  ADD COLUMN token_sha256 bytea,
  ADD COLUMN token_bytes  int,
  ADD COLUMN refused      jsonb;
-- A row holds its body, or its record: never both, never neither. NOT VALID: the
-- rows already stored all hold their body, and checking them would read the table.
ALTER TABLE events ADD CONSTRAINT events_body_or_record CHECK (
  CASE WHEN token IS NULL THEN token_sha256 IS NOT NULL AND token_bytes IS NOT NULL AND refused IS NOT NULL
       ELSE token_sha256 IS NULL AND token_bytes IS NULL AND refused IS NULL END) NOT VALID;
-- Retention (config retention.refusedSeconds) deletes records, oldest first.
CREATE INDEX events_records_received ON events (received_at) WHERE token IS NULL;
-- Every recipient refusal in one place, for audits and tests: the rows of events
-- that delivered to someone, and the pairs of those kept as records.
CREATE VIEW all_recipient_refusals AS
  SELECT iss, jti, client_id, reason, at FROM recipient_refusals
  UNION ALL
  SELECT e.iss, e.jti, r.value->>0, r.value->>1, e.received_at
  FROM events AS e CROSS JOIN LATERAL jsonb_array_elements(e.refused) AS r
  WHERE e.token IS NULL;
