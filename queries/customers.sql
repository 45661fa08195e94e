-- customers: a plain polling query, the shape most entities take.
--
-- key = "id", cursor = "updated_at", delete_column = "deleted_at": a soft-deleted
-- row (deleted_at not NULL) goes out as op = delete. Every selected column is
-- the payload. The application must set updated_at on every write, the soft
-- delete included.
--
-- The same text runs on SQLite, PostgreSQL and MySQL/MariaDB.
SELECT c.id, c.name, c.email, c.deleted_at, c.updated_at
FROM customers c
WHERE c.updated_at >= :since
