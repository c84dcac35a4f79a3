-- PaperTrader schema version 6 (PostgreSQL): settlement writes without
-- foreign-key checks on the rows it makes.
-- Storing a chunk's outcomes sets each order's tick_id and inserts a trade per
-- fill, and PostgreSQL checked each of those rows against ticks, users and
-- orders with a row lock: half of the statement's time (about 100 ms a chunk of
-- 10,000 orders; a third of settling 100,000).  Those rows cannot dangle: the
-- one statement that writes them takes tick_id from the tick being settled
-- (recorded before it) and makes every trade from the order row it settles,
-- with that order's user; and no user, order or tick is ever deleted.  The
-- other foreign keys (an order's user, a position's user, a session's user,
-- a price's tick) stay.
ALTER TABLE orders DROP CONSTRAINT orders_tick_id_fkey;
ALTER TABLE transactions DROP CONSTRAINT transactions_user_id_fkey;
ALTER TABLE transactions DROP CONSTRAINT transactions_order_id_fkey;
