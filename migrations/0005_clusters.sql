-- Clusters (service/clusters.py): one Kubernetes cluster's block per family, carved from a
-- site pool, with its five role pools carved from the block. The blocks and role pools are
-- ordinary pools (so every invariant of 0001 holds for them); this table ties them together
-- with the settings the cluster was planned with.
CREATE TABLE clusters (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- A DNS-1123 label: it names Kubernetes objects rendered for the cluster.
    name                 text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    template             text NOT NULL,
    settings             jsonb NOT NULL CHECK (jsonb_typeof(settings) = 'object'),
    block_pool_id        bigint NOT NULL REFERENCES pools (id),
    ipv4_block_pool_id   bigint REFERENCES pools (id),
    revision             bigint NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
-- One live cluster per name: a plan is idempotent by name; a deleted cluster's name is free.
CREATE UNIQUE INDEX clusters_name ON clusters (name) WHERE deleted_at IS NULL;

-- User-defined templates: complete settings (the built-in ones live in code). A template is
-- read when a cluster is planned; the cluster keeps its own copy of the settings.
CREATE TABLE cluster_templates (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    description  text NOT NULL DEFAULT '' CHECK (length(description) <= 1024),
    settings     jsonb NOT NULL CHECK (jsonb_typeof(settings) = 'object'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The history names cluster plans and deletions too (on the cluster's IPv6 block pool).
ALTER TABLE changes DROP CONSTRAINT changes_kind_check;
ALTER TABLE changes ADD CONSTRAINT changes_kind_check CHECK (kind IN (
    'space.created', 'pool.created', 'pool.deleted',
    'allocation.created', 'allocation.quarantined', 'allocation.released',
    'cluster.planned', 'cluster.deleted')) NOT VALID;
ALTER TABLE changes VALIDATE CONSTRAINT changes_kind_check;
