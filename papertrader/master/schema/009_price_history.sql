-- PaperTrader schema version 9: price history (spec 2.3.1) and stale prices.
-- Every retrieved price is kept with its market time: quoted_at, seconds since
-- the epoch (the provider's time for the price, or the retrieval time when it
-- gives none); prices stored before this version have none (NULL) and are in
-- no bar.  A tick now records only the prices retrieved fresh: a symbol whose
-- retrieval failed is not in it, and its queued orders wait for a tick that is.
-- prices_market_time finds a symbol's prices by market time, to rebuild a bar
-- as it was at an earlier tick (a reading's later pages).
ALTER TABLE prices ADD COLUMN quoted_at BIGINT;
CREATE INDEX prices_market_time ON prices (symbol, quoted_at, tick_id);

-- OHLC bars kept up to date as prices arrive: one row per symbol, bar length
-- (bar_seconds) and bar (start_at, a multiple of bar_seconds), upserted for
-- each price of each tick.  open and close are the prices of the first and
-- last market time in the bar (ties: the earlier tick opens, the later tick
-- closes); open_at and close_at those times.  first_tick is the tick that
-- made the bar, last_tick the last that changed it: a reading pinned at tick
-- T leaves out bars made after T and rebuilds from prices those changed after T.
CREATE TABLE price_bars (
    symbol TEXT NOT NULL,
    bar_seconds INTEGER NOT NULL CHECK (bar_seconds > 0),
    start_at BIGINT NOT NULL,
    open_cents BIGINT NOT NULL,
    high_cents BIGINT NOT NULL,
    low_cents BIGINT NOT NULL,
    close_cents BIGINT NOT NULL,
    open_at BIGINT NOT NULL,
    close_at BIGINT NOT NULL,
    first_tick BIGINT NOT NULL,
    last_tick BIGINT NOT NULL,
    PRIMARY KEY (symbol, bar_seconds, start_at)
);

-- The latest good price of each symbol (the last tick that priced it), so a
-- restarted master resumes every symbol's price, not only the last tick's.
-- Filled from the last tick recorded before this version (market time unknown).
CREATE TABLE latest_prices (
    symbol TEXT PRIMARY KEY,
    price_cents BIGINT NOT NULL CHECK (price_cents > 0),
    quoted_at BIGINT,
    tick_id BIGINT NOT NULL,
    retrieved_at TEXT NOT NULL
);
INSERT INTO latest_prices (symbol, price_cents, quoted_at, tick_id, retrieved_at)
    SELECT p.symbol, p.price_cents, NULL, p.tick_id, t.retrieved_at
    FROM prices p JOIN ticks t ON t.id = p.tick_id
    WHERE p.tick_id = (SELECT MAX(id) FROM ticks);
