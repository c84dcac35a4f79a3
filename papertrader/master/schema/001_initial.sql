-- PaperTrader schema version 1: accounts, sessions, prices, orders, history.
-- One file serves SQLite and PostgreSQL: {identity} and {real} are filled in
-- by the database's dialect (papertrader/master/database.py).
-- Money is integer cents; instants are ISO 8601 UTC text (sortable).

CREATE TABLE users (
    id {identity},
    username TEXT NOT NULL UNIQUE,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    cash_cents BIGINT NOT NULL CHECK (cash_cents >= 0),
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX users_username_any_case ON users (lower(username));

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users (id),
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE ticks (
    id {identity},
    retrieved_at TEXT NOT NULL
);

CREATE TABLE prices (
    tick_id BIGINT NOT NULL REFERENCES ticks (id),
    symbol TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents > 0),
    PRIMARY KEY (tick_id, symbol)
);

CREATE TABLE orders (
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
    tick_id BIGINT REFERENCES ticks (id),
    price_cents BIGINT,
    settled_at TEXT,
    CHECK ((status = 'queued') = (settled_at IS NULL))
);
CREATE INDEX orders_queued ON orders (status, id);
CREATE INDEX orders_user ON orders (user_id, id);

CREATE TABLE positions (
    user_id BIGINT NOT NULL REFERENCES users (id),
    symbol TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (user_id, symbol)
);

CREATE TABLE transactions (
    id {identity},
    user_id BIGINT NOT NULL REFERENCES users (id),
    order_id BIGINT NOT NULL UNIQUE REFERENCES orders (id),
    side TEXT NOT NULL CHECK (side IN ('buy', 'sell')),
    symbol TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    price_cents BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    cash_after_cents BIGINT NOT NULL CHECK (cash_after_cents >= 0),
    settled_at TEXT NOT NULL
);
CREATE INDEX transactions_user ON transactions (user_id, id);
