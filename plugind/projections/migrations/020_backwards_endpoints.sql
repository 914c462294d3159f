-- 020: plugin endpoints, their secret settings, and plugin storage. Numbered apart from the
-- core's and the Dify dialect's migrations.

-- A read model of the endpoint.* events (folded by the projector, rebuilt from the log like
-- plugins and tasks): a tenant's endpoints, with their settings as the events hold them, every
-- secret input masked. A removed endpoint's row is deleted.
CREATE TABLE endpoints (
    endpoint_id text        PRIMARY KEY,
    tenant_id   text        NOT NULL,
    plugin_id   text        NOT NULL,                -- author/name
    hook_id     text        NOT NULL UNIQUE,         -- the secret part of /e/{hook_id}/...
    name        text        NOT NULL,
    user_id     text        NOT NULL DEFAULT '',
    enabled     boolean     NOT NULL,
    settings    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX endpoints_tenant ON endpoints (tenant_id, created_at, endpoint_id);
CREATE INDEX endpoints_plugin ON endpoints (tenant_id, plugin_id, created_at);

-- The secret inputs of an endpoint's settings, as Dify encrypted them (its inner API,
-- namespace "endpoint"): written by the Dify dialect, never in the event log, so not rebuilt.
CREATE TABLE endpoint_secrets (
    endpoint_id text        PRIMARY KEY,
    tenant_id   text        NOT NULL,
    secrets     jsonb       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Plugin storage (self.session.storage): per tenant and plugin, plugin data rather than
-- plugind's state, so it is written directly and never rebuilt. `plugin_storage_usage` is the
-- sum of the value sizes, locked while a write checks the quota.
CREATE TABLE plugin_storage (
    tenant_id  text        NOT NULL,
    plugin_id  text        NOT NULL,                 -- author/name
    key        text        NOT NULL,
    value      bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, plugin_id, key)
);

CREATE TABLE plugin_storage_usage (
    tenant_id text   NOT NULL,
    plugin_id text   NOT NULL,
    bytes     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, plugin_id)
);
