-- PaperTrader schema version 5: settlement in chunks.
-- A tick is recorded with its prices first; its queue is then settled in
-- transactions of a bounded number of orders each, so that orders keep being
-- stored (for the next tick) while a large queue settles.  through_order_id
-- is the highest id of the orders the tick settles: those queued, and created
-- no later than the tick, when it was recorded (NULL: none).  settled is 0
-- until every one of them is settled; a tick left unsettled (the master was
-- killed, or a chunk failed) is finished at its own prices and time before
-- the next tick is recorded.  Ticks recorded before this version were settled
-- in one transaction, so they count as settled.

ALTER TABLE ticks ADD COLUMN through_order_id BIGINT;
ALTER TABLE ticks ADD COLUMN settled INTEGER NOT NULL DEFAULT 1;
CREATE INDEX ticks_unsettled ON ticks (id) WHERE settled = 0;

-- The queue's index holds queued orders only: settling an order removes it
-- from the index instead of adding a 'filled' entry, which keeps the index as
-- small as the queue and each settled order one index write cheaper.
DROP INDEX orders_queued;
CREATE INDEX orders_queued ON orders (id) WHERE status = 'queued';

-- The queue settles in id order, so a user's queued orders are among their
-- newest: the funds check finds them through orders_user (user_id, id) from
-- the oldest queued order on.  The index of each user's queued orders goes:
-- settling a chunk of orders removed entries from all over it, so every chunk
-- rewrote most of its pages.
DROP INDEX orders_user_queued;
