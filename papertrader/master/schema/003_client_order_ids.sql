-- PaperTrader schema version 3: client order ids.  A client may name each
-- order; a retry under the same name (after losing the answer) finds the
-- order already stored instead of storing a second one.  The database itself
-- keeps each name unique within an account.

ALTER TABLE orders ADD COLUMN client_order_id TEXT;
CREATE UNIQUE INDEX orders_client_order_id ON orders (user_id, client_order_id)
    WHERE client_order_id IS NOT NULL;
