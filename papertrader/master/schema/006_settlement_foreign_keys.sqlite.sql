-- PaperTrader schema version 6 (SQLite): settlement writes without
-- foreign-key checks on the rows it makes, as on PostgreSQL (see
-- 006_settlement_foreign_keys.postgresql.sql for why those rows cannot
-- dangle).  Each check is a lookup by primary key; together they were about
-- an eighth of settling 100,000 orders of 10,000 users.  SQLite cannot drop a
-- constraint, so both tables are rebuilt without them (their rows, ids,
-- CHECK constraints and indexes as they were): transactions first, so that
-- nothing refers to orders when it is rebuilt.

CREATE TABLE transactions_rebuilt (
    id {identity},
    user_id BIGINT NOT NULL,
    order_id BIGINT NOT NULL UNIQUE,
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    symbol TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    cash_after_cents BIGINT NOT NULL CHECK (cash_after_cents >= 0),
    settled_at TEXT NOT NULL
);
INSERT INTO transactions_rebuilt (id, user_id, order_id, side, symbol, quantity, price_cents, total_cents,
                                  cash_after_cents, settled_at)
    SELECT id, user_id, order_id, side, symbol, quantity, price_cents, total_cents, cash_after_cents, settled_at
    FROM transactions;
DROP TABLE transactions;
ALTER TABLE transactions_rebuilt RENAME TO transactions;
CREATE INDEX transactions_user ON transactions (user_id, id);

CREATE TABLE orders_rebuilt (
    id {identity},
    user_id BIGINT NOT NULL REFERENCES users (id),
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    symbol TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    status TEXT NOT NULL CHECK (status IN ('queued', 'filled', 'rejected')),
    reason TEXT,
    created_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    client_address TEXT NOT NULL,
    worker TEXT NOT NULL,
    tick_id BIGINT,
    price_cents BIGINT,
    settled_at TEXT,
    client_order_id TEXT,
    CHECK ((status = 'queued') = (settled_at IS NULL))
);
INSERT INTO orders_rebuilt (id, user_id, side, symbol, quantity, status, reason, created_at, received_at,
                            client_address, worker, tick_id, price_cents, settled_at, client_order_id)
    SELECT id, user_id, side, symbol, quantity, status, reason, created_at, received_at,
           client_address, worker, tick_id, price_cents, settled_at, client_order_id
    FROM orders;
DROP TABLE orders;
ALTER TABLE orders_rebuilt RENAME TO orders;
CREATE INDEX orders_queued ON orders (id) WHERE status = 'queued';
CREATE INDEX orders_user ON orders (user_id, id);
CREATE UNIQUE INDEX orders_client_order_id ON orders (user_id, client_order_id)
    WHERE client_order_id IS NOT NULL;
