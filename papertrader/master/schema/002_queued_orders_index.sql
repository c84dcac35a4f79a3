-- PaperTrader schema version 2: find a user's queued orders without reading
-- their settled ones (the funds check before queueing sums them).

CREATE INDEX orders_user_queued ON orders (user_id) WHERE status = 'queued';
