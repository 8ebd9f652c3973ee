-- A client's own rate buckets (all senders together, and each sender's) move
-- into its row: the commit locks and rewrites that row for the delivery cursor
-- anyway, so charging them costs no row of its own (measured, npm run bench:
-- two bucket rows per delivery were most of what rate limiting cost).
-- {"*": [tokens, updated_at], "<sender>": [tokens, updated_at], …}; a bucket that
-- is full is not kept. rate_buckets keeps the senders' buckets.
ALTER TABLE clients ADD COLUMN buckets jsonb NOT NULL DEFAULT '{}';
-- Client-scoped buckets start again full (they refill within minutes anyway).
DELETE FROM rate_buckets WHERE key NOT LIKE 's:%';
