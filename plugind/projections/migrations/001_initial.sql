-- 001: the event log, the package store, the read models and the projector's checkpoints.
-- Applied by plugind.projections.migrate inside one transaction; never edit a released file,
-- add a new numbered one instead.

CREATE TABLE event_log (
    position   bigint      PRIMARY KEY,           -- 1, 2, 3 ... gap-free, in stream order
    stream_id  text        NOT NULL UNIQUE,        -- the Redis entry id in {ns}:events
    event_id   text        UNIQUE,                 -- NULL only for entries that were not events
    type       text        NOT NULL,               -- event type, or 'unknown'
    request_id text,
    tenant_id  text,
    plugin_id  text,                               -- author/name (short form), NULL if none
    at         timestamptz NOT NULL,
    payload    jsonb       NOT NULL,               -- the event as stored (the hash covers it)
    hash       bytea       NOT NULL CHECK (octet_length(hash) = 32)
);
CREATE INDEX event_log_type_position ON event_log (type, position);
CREATE INDEX event_log_plugin_position ON event_log (plugin_id, position) WHERE plugin_id IS NOT NULL;
CREATE INDEX event_log_request ON event_log (request_id, position) WHERE request_id IS NOT NULL;
CREATE INDEX event_log_tenant_position ON event_log (tenant_id, position);
CREATE INDEX event_log_at ON event_log (at);

CREATE TABLE packages (
    sha256      text        PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    identifier  text        NOT NULL,
    size        bigint      NOT NULL,
    declaration jsonb       NOT NULL,
    data        bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX packages_identifier ON packages (identifier, created_at DESC);

CREATE TABLE plugins (
    tenant_id    text        NOT NULL,
    plugin_id    text        NOT NULL,             -- author/name
    identifier   text        NOT NULL,             -- author/name:version@checksum
    version      text        NOT NULL,
    status       text        NOT NULL CHECK (status IN ('installed', 'uninstalled')),
    manifest     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    installed_at timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, plugin_id)
);
CREATE INDEX plugins_status ON plugins (status, tenant_id);

CREATE TABLE tasks (
    request_id  text        PRIMARY KEY,
    tenant_id   text        NOT NULL,
    plugin_id   text,                              -- author/name; NULL when never known
    identifier  text,
    access      text,
    action      text,
    status      text        NOT NULL CHECK (status IN (
                    'running', 'succeeded', 'failed', 'timed_out', 'rejected', 'dead_lettered')),
    attempts    integer     NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL,
    started_at  timestamptz,
    finished_at timestamptz,
    duration_ms double precision,
    result      jsonb,
    error       jsonb
);
CREATE INDEX tasks_plugin_finished ON tasks (plugin_id, finished_at);
CREATE INDEX tasks_finished ON tasks (finished_at);
CREATE INDEX tasks_status ON tasks (status);
-- the stats window: "last activity" of a task, terminal or not
CREATE INDEX tasks_activity ON tasks ((coalesce(finished_at, created_at)));

CREATE TABLE projection_checkpoints (
    name           text        PRIMARY KEY,
    stream         text,                           -- the events stream this projection follows
    last_stream_id text,
    last_position  bigint      NOT NULL DEFAULT 0,
    head_hash      bytea       NOT NULL DEFAULT decode(repeat('00', 32), 'hex'),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
