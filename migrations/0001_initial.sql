-- kipam schema, version 1: spaces, pools, allocations and their history.
--
-- The database itself enforces DESIGN.md's invariants; the service's locks only cut
-- contention. Every check below would still hold with the service's code removed:
--   1. held (active or quarantined) allocations of one pool never overlap  (exclusion)
--      root pools of one space never overlap                                (exclusion)
--   2. an allocation lies inside its pool's CIDR                         (FK + CHECK)
--      and outside the pool's reserved ranges                            (trigger)
--   4. one idempotency key per pool                                      (unique index)
--      states move only active -> quarantined -> released, and a row's identity
--      (pool, prefix, owner, created_at) never changes                   (trigger)
--   8. prefixes are `cidr`, never integer offsets.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- One global, monotonically increasing revision stamped on every change.
CREATE SEQUENCE kipam_revision AS bigint;

CREATE TABLE spaces (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE
                CHECK (name ~ '^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO spaces (name) VALUES ('default');

CREATE TABLE pools (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    space_id              bigint NOT NULL REFERENCES spaces (id),
    -- A path: segments of lower-case letters, digits, '.', '_' and '-', joined by '/'.
    name                  text NOT NULL
                          CHECK (name ~ '^[a-z0-9]([a-z0-9._-]*[a-z0-9])?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*$'
                                 AND length(name) <= 253),
    cidr                  cidr NOT NULL,
    role                  text NOT NULL
                          CHECK (role IN ('container', 'node', 'pod', 'service', 'ingress', 'egress')),
    parent_id             bigint REFERENCES pools (id),
    -- A child pool's CIDR *is* an allocation in its parent (DESIGN.md, "pool").
    parent_allocation_id  bigint,
    policy                jsonb NOT NULL CHECK (jsonb_typeof(policy) = 'object'),
    labels                jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    -- Bumped by every transaction that changes the pool's allocations: the engine cache
    -- is trusted only while its generation equals this (invariant 6).
    generation            bigint NOT NULL DEFAULT 0 CHECK (generation >= 0),
    revision              bigint NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    deleted_at            timestamptz,
    UNIQUE (id, cidr),
    CONSTRAINT pools_parent_allocation CHECK ((parent_id IS NULL) = (parent_allocation_id IS NULL)),
    CONSTRAINT pools_root_overlap
        EXCLUDE USING gist (space_id WITH =, cidr inet_ops WITH &&)
        WHERE (parent_id IS NULL AND deleted_at IS NULL)
);
-- Names are unique among live pools; a deleted pool's name may be reused.
CREATE UNIQUE INDEX pools_name ON pools (name) WHERE deleted_at IS NULL;
CREATE INDEX pools_parent ON pools (parent_id) WHERE parent_id IS NOT NULL;

-- Allocations are partitioned by pool, one partition per pool, created with the pool (see
-- kipam_pool_partition below). Each partition carries its own overlap constraint on the
-- prefix alone, an SP-GiST exclusion: its cost per insert stays flat from 10^4 to 10^6 held
-- prefixes, where a GiST (pool_id =, prefix &&) constraint over one table grows with it
-- (bench/RESULTS.md, "overlap constraint").
CREATE SEQUENCE allocations_id_seq AS bigint;
CREATE TABLE allocations (
    id               bigint NOT NULL DEFAULT nextval('allocations_id_seq'),
    pool_id          bigint NOT NULL,
    -- The pool's CIDR, carried along so that containment is a plain CHECK, and pinned to
    -- the pool row by the foreign key.
    pool_cidr        cidr NOT NULL,
    prefix           cidr NOT NULL,
    owner            text NOT NULL CHECK (length(owner) BETWEEN 1 AND 512),
    labels           jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    state            text NOT NULL DEFAULT 'active'
                     CHECK (state IN ('active', 'quarantined', 'released')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    released_at      timestamptz,
    reusable_at      timestamptz,
    revision         bigint NOT NULL,
    PRIMARY KEY (pool_id, id),
    FOREIGN KEY (pool_id, pool_cidr) REFERENCES pools (id, cidr),
    UNIQUE (id, pool_id, prefix),
    CONSTRAINT allocations_inside_pool CHECK (prefix <<= pool_cidr),
    CONSTRAINT allocations_released_at CHECK ((state = 'active') = (released_at IS NULL)),
    CONSTRAINT allocations_reusable_at CHECK (
        (state = 'active') = (reusable_at IS NULL) AND reusable_at >= released_at)
) PARTITION BY LIST (pool_id);
ALTER SEQUENCE allocations_id_seq OWNED BY allocations.id;
CREATE UNIQUE INDEX allocations_idempotency ON allocations (pool_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- "allocations containing address X" and "allocations inside prefix P" are index scans.
CREATE INDEX allocations_prefix ON allocations USING spgist (prefix inet_ops);
CREATE INDEX allocations_pool_state ON allocations (pool_id, state, id);
CREATE INDEX allocations_owner ON allocations (owner, id);
CREATE INDEX allocations_quarantine ON allocations (pool_id, reusable_at)
    WHERE state = 'quarantined';

ALTER TABLE pools
    ADD FOREIGN KEY (parent_allocation_id, parent_id, cidr)
    REFERENCES allocations (id, pool_id, prefix);

-- Every change, in one ordered log: the history (who, when, which request and trace) and
-- the feed from which engine caches refresh and watchers resume.
CREATE TABLE changes (
    revision         bigint PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction, so a reader can tell which revisions are committed for sure
    -- (everything below the oldest transaction still running).
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    kind             text NOT NULL CHECK (kind IN (
                         'space.created', 'pool.created', 'pool.deleted',
                         'allocation.created', 'allocation.quarantined', 'allocation.released')),
    pool_id          bigint NOT NULL REFERENCES pools (id),
    pool_name        text NOT NULL,
    -- The pool's generation after the change: an engine at generation g replays g+1...
    pool_generation  bigint NOT NULL,
    allocation_id    bigint,
    prefix           cidr,
    owner            text,
    actor            text NOT NULL,
    request_id       text,
    trace_id         text,
    data             jsonb NOT NULL DEFAULT '{}',
    FOREIGN KEY (pool_id, allocation_id) REFERENCES allocations (pool_id, id)
);
CREATE INDEX changes_pool ON changes (pool_id, pool_generation);
CREATE INDEX changes_prefix ON changes USING spgist (prefix inet_ops);
CREATE INDEX changes_allocation ON changes (allocation_id) WHERE allocation_id IS NOT NULL;

-- Invariant 1: every pool gets its partition of allocations, with the overlap constraint,
-- in the transaction that creates the pool. Created apart and then attached, so that only a
-- SHARE UPDATE EXCLUSIVE lock is taken on `allocations`: allocations in other pools go on.
CREATE FUNCTION kipam_pool_partition() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('allocations_p%s', NEW.id);
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE allocations INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I EXCLUDE USING spgist (prefix inet_ops WITH &&)'
                   ' WHERE (state <> %L)', part, part || '_overlap', 'released');
    EXECUTE format('ALTER TABLE allocations ATTACH PARTITION %I FOR VALUES IN (%s)', part, NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER pools_partition AFTER INSERT ON pools
    FOR EACH ROW EXECUTE FUNCTION kipam_pool_partition();

-- Invariant 2, second half: nothing is held inside a reserved range of its pool. One check
-- per statement over the inserted rows (a transition table), so a batch of a thousand
-- allocations pays for one query, not a thousand.
CREATE FUNCTION kipam_allocations_outside_reserved() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hit record;
BEGIN
    SELECT n.prefix, n.pool_id, r.reserved INTO hit
      FROM new_rows n
      JOIN pools p ON p.id = n.pool_id
     CROSS JOIN LATERAL jsonb_array_elements_text(p.policy -> 'reserved') AS r (reserved)
     WHERE r.reserved::cidr && n.prefix
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'allocation % overlaps reserved range % of pool %',
                        hit.prefix, hit.reserved, hit.pool_id
            USING ERRCODE = 'exclusion_violation', CONSTRAINT = 'allocations_reserved';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER allocations_reserved AFTER INSERT ON allocations
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION kipam_allocations_outside_reserved();

-- States move forward only; what was allocated, to whom and when never changes.
CREATE FUNCTION kipam_allocation_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.pool_id, NEW.pool_cidr, NEW.prefix, NEW.owner, NEW.created_at, NEW.idempotency_key)
       IS DISTINCT FROM
       (OLD.pool_id, OLD.pool_cidr, OLD.prefix, OLD.owner, OLD.created_at, OLD.idempotency_key) THEN
        RAISE EXCEPTION 'allocation % is write-once: pool, prefix, owner, key and creation time never change', OLD.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'allocations_write_once';
    END IF;
    IF NOT ((OLD.state, NEW.state) IN (('active', 'active'), ('active', 'quarantined'),
                                       ('active', 'released'), ('quarantined', 'quarantined'),
                                       ('quarantined', 'released'), ('released', 'released')))
       OR (OLD.state = 'released' AND NEW IS DISTINCT FROM OLD) THEN
        RAISE EXCEPTION 'allocation % cannot go from % to %', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation', CONSTRAINT = 'allocations_transition';
    END IF;
    IF OLD.state = 'active' AND NEW.state <> 'active' AND EXISTS (
        SELECT 1 FROM pools WHERE parent_allocation_id = OLD.id AND deleted_at IS NULL
    ) THEN
        RAISE EXCEPTION 'allocation % is the CIDR of a live child pool; delete the pool first', OLD.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'allocations_child_pool';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER allocations_transition BEFORE UPDATE ON allocations
    FOR EACH ROW EXECUTE FUNCTION kipam_allocation_transition();

CREATE FUNCTION kipam_forbid_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are history and are never deleted', TG_TABLE_NAME
        USING ERRCODE = 'check_violation', CONSTRAINT = TG_TABLE_NAME || '_no_delete';
END $$;

CREATE TRIGGER allocations_no_delete BEFORE DELETE ON allocations
    FOR EACH ROW EXECUTE FUNCTION kipam_forbid_delete();
CREATE TRIGGER changes_no_delete BEFORE DELETE ON changes
    FOR EACH ROW EXECUTE FUNCTION kipam_forbid_delete();
