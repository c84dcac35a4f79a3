-- PaperTrader schema version 4: idle expiry of sessions.
-- last_used_at is when the session was last used (written at most once a
-- minute per session); remember is 1 for "remember me" sessions, which get
-- the longer idle timeout.  Sessions stored before this version have neither:
-- they count as used when first seen afterwards and as "remember me" (the
-- lenient choice; their absolute expiry still holds).

ALTER TABLE sessions ADD COLUMN last_used_at {real};
ALTER TABLE sessions ADD COLUMN remember INTEGER CHECK (remember IN (0, 1));
