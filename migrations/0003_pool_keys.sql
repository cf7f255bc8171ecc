-- Pools get what allocations already have: an idempotency key, so that a retried create
-- (REST `Idempotency-Key`, gRPC `idempotency_key`) answers with the pool it made the first
-- time. Keys are global (clients make them unique, e.g. UUIDs) and kept after a delete.
ALTER TABLE pools
    ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 256);
CREATE UNIQUE INDEX pools_idempotency_key ON pools (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- REST paths put sub-resources after a pool's name (/v1/pools/{name}/usage); a name ending
-- in one of them could not be addressed (service.models.SUBRESOURCES says the same).
ALTER TABLE pools ADD CONSTRAINT pools_name_subresource
    CHECK (name !~ '(^|/)(allocations|available|usage)$');
