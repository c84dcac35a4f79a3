-- PaperTrader schema version 7 (PostgreSQL): room on the pages of users and
-- positions for their rows' next versions.
-- Each settlement chunk rewrites the cash of every user it fills and the
-- position of every holding it changes (10,000 users: some 6,000 users and
-- 8,000 positions a chunk).  When the new version fits on the row's own page
-- PostgreSQL writes no index entries for it (a heap-only update); on full
-- pages every one went into each index as well.  With 30 % of each page left
-- free, nearly all of them fit (6 % faster settling 100,000 orders of 10,000
-- users).  Pages written before this version fill as they did.
ALTER TABLE users SET (fillfactor = 70);
ALTER TABLE positions SET (fillfactor = 70);
