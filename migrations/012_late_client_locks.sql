-- Workers no longer serialize on shared clients (issue 16). A batch used to lock
-- every client it delivers to from its read (statement 2) to COMMIT, to assign
-- cursors and charge the client's buckets (kept in its row) exactly; two
-- workers' batches to one group's clients then ran one after the other, for the
-- whole of each transaction. Now the read takes no lock, and the last statement
-- bumps each client's cursor and charges its buckets atomically, from the row as
-- it is then (READ COMMITTED re-reads a row another transaction changed), so the
-- lock is held only from that statement to COMMIT.
--
-- The charge is conditional, as for the senders' buckets (migrations/007): the
-- batch was decided on buckets read without a lock, and its decisions stand only
-- if each bucket still holds what the batch needed. Where one no longer does,
-- this raises FR001 and the batch runs again with the clients locked first.
--
-- stored: the client's buckets, {slot: [tokens, updated_at]} (migrations/006).
-- charges: {slot: [rate, burst, charged, needed]}; a slot charged nothing is
-- dropped if full (absent means full), else left as it is.
-- The refill is the arithmetic of refilledTokens() in src/policy/rate-limit.ts.
CREATE FUNCTION charge_client_buckets(stored jsonb, charges jsonb, now float8) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  slot text;
  c jsonb;
  available float8;
  result jsonb := stored;
BEGIN
  FOR slot, c IN SELECT * FROM jsonb_each(charges) LOOP
    available := CASE WHEN stored ? slot
      THEN least((c->>1)::float8, (stored->slot->>0)::float8 + greatest(0, now - (stored->slot->>1)::float8) * (c->>0)::float8)
      ELSE (c->>1)::float8 END;
    IF available < (c->>3)::float8 THEN
      RAISE EXCEPTION 'a client''s bucket changed since it was read (% short of %)', slot, c->>3
        USING ERRCODE = 'FR001';
    END IF;
    IF (c->>2)::float8 = 0 THEN
      IF available >= (c->>1)::float8 THEN result := result - slot; END IF;
    ELSE
      result := jsonb_set(result, ARRAY[slot], jsonb_build_array(available - (c->>2)::float8,
        greatest(now, coalesce((stored->slot->>1)::float8, now))));
    END IF;
  END LOOP;
  RETURN result;
END
$$;
