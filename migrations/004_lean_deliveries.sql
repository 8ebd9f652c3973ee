-- Measured (npm run bench): per delivery row, the unique (client_id, iss, jti)
-- index and the two foreign-key lookups cost more than the row itself, and the
-- commit already guarantees what they checked: deliveries are written only for
-- an event inserted in the same transaction (the events primary key makes that
-- once per (iss, jti)), for clients locked in that transaction, and rcpt holds
-- each cid once. removeClient deletes a client's deliveries itself.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_client_id_iss_jti_key;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_client_id_fkey;
ALTER TABLE deliveries DROP CONSTRAINT deliveries_iss_jti_fkey;
