-- PaperTrader schema version 8: the workers allowed to connect (spec 3.1.5).
-- A worker proves who it is by signing the master's nonce with the OpenPGP
-- key registered here (its fingerprint, and the armored public key as it was
-- last imported into the master's keyring).  networks is a space-separated
-- list of CIDR blocks its connections must come from (empty: anywhere);
-- enabled is 1 while it may connect.

CREATE TABLE workers (
    id {identity},
    name TEXT NOT NULL UNIQUE,
    uuid TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    networks TEXT NOT NULL DEFAULT '',
    enabled INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    added_at TEXT NOT NULL
);
