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
-- charges: [[slot, rate, burst, charged, needed], …]; a slot charged nothing is
-- dropped if full (absent means full), else left as it is. An array, read by
-- index, not an object: jsonb_each is a query of its own on every call
-- (measured in psql, 100,000 calls of two slots: 0.6–1.0 s against 0.8–1.5 s).
-- The refill is the arithmetic of refilledTokens() in src/policy/rate-limit.ts.
CREATE FUNCTION charge_client_buckets(stored jsonb, charges jsonb, now float8) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  c jsonb;
  s jsonb;
  slot text;
  burst float8;
  charged float8;
  available float8;
  result jsonb := stored;
BEGIN
  FOR i IN 0 .. jsonb_array_length(charges) - 1 LOOP
    c := charges->i;
    slot := c->>0;
    burst := (c->2)::float8;
    charged := (c->3)::float8;
    s := stored->slot;
    available := CASE WHEN s IS NULL THEN burst
      ELSE least(burst, (s->0)::float8 + greatest(0, now - (s->1)::float8) * (c->1)::float8) END;
    IF available < (c->4)::float8 THEN
      RAISE EXCEPTION 'a client''s bucket changed since it was read (% short of %)', slot, c->4
        USING ERRCODE = 'FR001';
    END IF;
    IF charged = 0 THEN
      IF available >= burst THEN result := result - slot; END IF;
    ELSE
      result := jsonb_set(result, ARRAY[slot], jsonb_build_array(available - charged,
        CASE WHEN s IS NULL THEN now ELSE greatest(now, (s->1)::float8) END));
    END IF;
  END LOOP;
  RETURN result;
END
$$;
