-- The commit sends its last statement and COMMIT together (one round trip, and
-- the rows it locks are released as soon as it has run). That statement charges
-- the senders' buckets read without a lock, on condition that each still covers
-- the batch; where one no longer does, it now fails with this error instead of
-- returning a count to check, so the COMMIT behind it rolls back, and the batch
-- runs again with the bucket locked.
CREATE FUNCTION sender_bucket_race(expected int, charged int) RETURNS int
LANGUAGE plpgsql AS $$
BEGIN
  IF charged <> expected THEN
    RAISE EXCEPTION 'a sender''s bucket changed since it was read (% of % charged)', charged, expected
      USING ERRCODE = 'FR001';
  END IF;
  RETURN charged;
END
$$;
