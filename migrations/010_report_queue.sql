-- Delivery reports (DESIGN §8) leave the receive path: the commit that decides
-- an event queues its report here, in the same transaction, and a loop of its
-- own in each worker publishes them. A batch is acknowledged once committed,
-- never after a peer's report stream has answered: a peer that does not
-- acknowledge its reports delays nothing but its own.
-- The report itself is built when it is sent, from what the commit stored
-- (the event's recipients less its refusals), as for a duplicate.
CREATE TABLE report_queue (
  iss       text NOT NULL,
  jti       text NOT NULL,
  queued_at timestamptz NOT NULL DEFAULT now(),
  attempts  int NOT NULL DEFAULT 0,
  -- Due from then: claimed by a worker for a while (a lease), or put off after a failure.
  due_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (iss, jti)
);
CREATE INDEX report_queue_due ON report_queue (due_at);
