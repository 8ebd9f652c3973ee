-- Measured (npm run bench, 1-recipient events): the foreign key from events to
-- peer_keys runs a lookup and a row lock per stored event, and the commit
-- already guarantees it (the verifying key is inserted in the same transaction,
-- before its events, and keys are never deleted).
ALTER TABLE events DROP CONSTRAINT events_key_thumbprint_fkey;
-- A token is base64url of mostly incompressible bytes (signature, an encrypted
-- body): pglz spent more CPU on a 2 KB token than any other function of the
-- commit, for next to no saving. Rows stay uncompressed up to a page; larger
-- events (hundreds of recipients) are still compressed and toasted.
ALTER TABLE events SET (toast_tuple_target = 8160);
