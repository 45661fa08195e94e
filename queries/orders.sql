-- orders: one message per order, sent again when the order or its customer
-- changes (the payload carries the customer's name and email).
--
-- key = "id", cursor = "changed_at": the later of the two rows' timestamps,
-- so that a change of either row moves the order into the window.
-- This is SQLite, where max() with two arguments is a scalar function.
-- On PostgreSQL and MySQL/MariaDB write
--   GREATEST(o.updated_at, c.updated_at) AS changed_at
-- (see queries/README.md).
SELECT o.id, o.customer_id, c.name AS customer_name, c.email AS customer_email,
       o.total_cents, o.status,
       max(o.updated_at, c.updated_at) AS changed_at
FROM orders o
JOIN customers c ON c.id = o.customer_id
WHERE o.updated_at >= :since OR c.updated_at >= :since
