-- Every committed batch rewrites the row of each client it delivers to (cursor
-- and rate buckets). With full pages, many of those updates could not stay on
-- their page: each then wrote a new index entry and left the table to grow until
-- vacuum. Keeping 30 % of each page free lets nearly all of them be HOT updates.
-- Measured through commitBatch, 40,000 deliveries to 1,000 clients in batches of
-- 200: 72 % → 96 % HOT, the table 1,976 kB → 456 kB, the same Postgres CPU.
-- Applies to pages written from now on; VACUUM FULL clients rewrites the rest.
ALTER TABLE clients SET (fillfactor = 70);
