-- 010: the Dify dialect's own state (plugind/dify). Numbered apart from the core's migrations.
-- An install task of Dify's console: one install command per plugin, with request ids
-- `<task id>:<n>`; its status is never stored here but folded from those requests' events.

CREATE TABLE dify_install_tasks (
    id         text        PRIMARY KEY,
    tenant_id  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- [{"identifier", "plugin_id", "request_id" (null: it was already installed), "sha256"}]
    plugins    jsonb       NOT NULL
);
CREATE INDEX dify_install_tasks_tenant ON dify_install_tasks (tenant_id, created_at DESC);

-- Where a tenant's installed version came from, as Dify said when it asked for the install
-- (`source`: package, marketplace, github, remote; `meta`: Dify's own bookkeeping, returned as is).
CREATE TABLE dify_install_sources (
    tenant_id  text        NOT NULL,
    identifier text        NOT NULL,
    source     text        NOT NULL,
    meta       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, identifier)
);
