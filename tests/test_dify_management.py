"""Dify's management routes, one contract test per route, as dify-api calls them.

One daemon for the module (its own namespace and database), with the calc and parrot examples
installed once for the tenant through plugind's own client (so they were not installed through
Dify: the adapter must list them anyway). Requests are what dify-api's ``PluginInstaller``,
``PluginToolManager``, ``PluginModelClient``... send over a real socket (multipart field names,
a JSON body on the GET decode route, ``X-Api-Key``); answers are parsed with dify-api's rules
(``dify_wire.envelope_data``) and then decoded strictly into the shapes dify-api validates
(``plugind.dify.shapes``).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import msgspec
import pytest
from dify_wire import DifyApi, DifyEnv, DifyRaised, envelope_data, running_dify
from e2e import EXAMPLE_CALC, REPO
from plugin_factory import ECHO, ICON, package_bytes, write_plugin

from plugind.bus.codec import event_fields
from plugind.bus.keys import installed_field
from plugind.dify import shapes
from plugind.dify.declarations import parse_asset_id
from plugind.messages import EventFactory, Installed
from plugind.package.difypkg import build_package, read_package
from plugind.projections.package_store import store_package

pytestmark = pytest.mark.anyio

EXAMPLE_PARROT = REPO / "examples" / "plugins" / "parrot"
TENANT = "tenant-mgmt"
OTHER_TENANT = "tenant-other"
MAX_PACKAGE = 64 * 1024
S = TypeVar("S")


@pytest.fixture(scope="module")
async def env(
    admin_database_url: str, redis_url: str, shared_plugin_dir: Path
) -> AsyncIterator[DifyEnv]:
    packages = [build_package(EXAMPLE_CALC), build_package(EXAMPLE_PARROT)]
    async with running_dify(
        admin_database_url=admin_database_url,
        redis_url=redis_url,
        plugin_dir=shared_plugin_dir,
        packages=packages,
        tenant=TENANT,
        max_package_size=MAX_PACKAGE,
    ) as running:
        yield running


@pytest.fixture
async def api(env: DifyEnv) -> AsyncIterator[DifyApi]:
    client = DifyApi(env.base_url, env.key)
    yield client
    await client.aclose()


# -- calling the daemon the way dify-api does --------------------------------------------------


async def call(
    api: DifyApi,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    files: dict[str, Any] | None = None,
    form: dict[str, str] | None = None,
    tenant: str = TENANT,
) -> Any:
    """``data`` of the answer, parsed as ``_request_with_plugin_daemon_response`` does."""
    response = await request(
        api, method, path, body=body, params=params, files=files, form=form, tenant=tenant
    )
    assert response.status_code == 200, (path, response.status_code, response.text)
    return envelope_data(response.content)


async def request(
    api: DifyApi,
    method: str,
    path: str,
    *,
    body: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    files: dict[str, Any] | None = None,
    form: dict[str, str] | None = None,
    tenant: str = TENANT,
) -> httpx.Response:
    headers = {"X-Api-Key": api.key}
    content = None
    if body is not None:  # dify-api: a dict is JSON only with this header, even on a GET
        headers["Content-Type"] = "application/json"
        content = json.dumps(body).encode()
    return await api.http.request(
        method,
        f"/plugin/{tenant}/{path}",
        headers=headers,
        content=content,
        params=params,
        files=files,
        data=form,
    )


async def refused(api: DifyApi, method: str, path: str, **options: Any) -> DifyRaised:
    """The exception dify-api raises for this call (the test fails if it succeeds)."""
    try:
        data = await call(api, method, path, **options)
    except DifyRaised as exc:
        return exc
    raise AssertionError(f"{method} {path} succeeded: {data!r}")


def shaped(data: Any, type_: type[S]) -> S:
    """``data`` decoded strictly into a Dify shape: required fields present, types right."""
    return msgspec.convert(data, type_)


async def upload(api: DifyApi, package: bytes, *, verify: bool = False) -> Any:
    return await call(
        api,
        "POST",
        "management/install/upload/package",
        files={"dify_pkg": ("dify_pkg", package, "application/octet-stream")},
        form={"verify_signature": "true" if verify else "false"},
    )


async def until_done(
    api: DifyApi, task_id: str, tenant: str, timeout: float = 300
) -> shapes.InstallTask:
    """Poll the install task as the console does, until success or failure."""
    deadline = time.monotonic() + timeout
    while True:
        task = shaped(
            await call(api, "GET", f"management/install/tasks/{task_id}", tenant=tenant),
            shapes.InstallTask,
        )
        if task.status in ("success", "failed"):
            return task
        assert time.monotonic() < deadline, task
        await anyio.sleep(0.2)


def build_tester(folder: Path, version: str) -> bytes:
    return package_bytes(
        write_plugin(folder / version, name="mgmt-tester", version=version, tools={"echo": ECHO})
    )


# -- upload, decode, fetch -------------------------------------------------------------------


async def test_upload_then_decode_fetch_and_assets(api: DifyApi, tmp_path: Path) -> None:
    package = build_tester(tmp_path, "0.1.0")
    identifier = read_package(package, max_size=MAX_PACKAGE).identifier
    uploaded = shaped(await upload(api, package), shapes.DecodeResponse)
    assert uploaded.unique_identifier == identifier
    assert uploaded.verification is None
    manifest = shaped(uploaded.manifest, shapes.PluginDeclaration)
    assert (manifest.author, manifest.name, manifest.version) == ("acme", "mgmt-tester", "0.1.0")
    assert manifest.tool is not None and manifest.tool["identity"]["name"] == "mgmt_tester"
    assert [t["identity"]["name"] for t in manifest.tool["tools"]] == ["echo"]
    assert parse_asset_id(manifest.icon) is not None and manifest.icon.endswith(".svg")

    # decode_plugin_from_identifier: a JSON body on a GET; the query string works too
    decoded = await call(
        api,
        "GET",
        "management/decode/from_identifier",
        body={"plugin_unique_identifier": identifier},
    )
    assert decoded == msgspec.to_builtins(uploaded)
    by_query = await call(
        api,
        "GET",
        "management/decode/from_identifier",
        params={"plugin_unique_identifier": identifier},
    )
    assert by_query["unique_identifier"] == identifier

    params = {"plugin_unique_identifier": identifier}
    assert await call(api, "GET", "management/fetch/identifier", params=params) is True
    fetched = await call(api, "GET", "management/fetch/manifest", params=params)
    assert shaped(fetched, shapes.PluginDeclaration).icon == manifest.icon
    readme = await call(api, "GET", "management/fetch/readme", params=params)
    assert shaped(readme, shapes.Readme).language == "en_US"

    # PluginAssetManager.fetch_asset: raw bytes, 200; the id keeps the extension
    icon = await api.http.get(f"/plugin/{TENANT}/asset/{manifest.icon}", headers=api.headers())
    assert icon.status_code == 200 and icon.content == ICON.encode()
    assert icon.headers["content-type"].startswith("image/svg+xml")
    gone = await api.http.get(f"/plugin/{TENANT}/asset/{'0' * 80}.svg", headers=api.headers())
    assert gone.status_code == 404

    unknown = identifier.rsplit("@", 1)[0] + "@" + "0" * 64
    params = {"plugin_unique_identifier": unknown}
    assert await call(api, "GET", "management/fetch/identifier", params=params) is False
    missing = await refused(
        api, "GET", "management/decode/from_identifier", body={"plugin_unique_identifier": unknown}
    )
    assert missing.raised == "PluginDaemonNotFoundError"
    malformed = await refused(
        api, "GET", "management/fetch/manifest", params={"plugin_unique_identifier": "nope"}
    )
    assert malformed.raised == "PluginUniqueIdentifierError"


async def test_uploads_that_are_refused(api: DifyApi, env: DifyEnv, tmp_path: Path) -> None:
    package = build_tester(tmp_path, "0.1.0")
    unsigned = await refused(
        api,
        "POST",
        "management/install/upload/package",
        files={"dify_pkg": ("dify_pkg", package, "application/octet-stream")},
        form={"verify_signature": "true"},
    )
    assert unsigned.raised == "PluginDaemonBadRequestError"
    assert "PLUGIN_SIGNATURE_PUBLIC_KEYS" in unsigned.description

    not_a_package = await refused(
        api,
        "POST",
        "management/install/upload/package",
        files={"dify_pkg": ("dify_pkg", b"PK not really", "application/octet-stream")},
    )
    assert not_a_package.raised == "PluginDaemonBadRequestError"
    assert "zip" in not_a_package.description

    no_field = await refused(
        api,
        "POST",
        "management/install/upload/package",
        files={"package": ("x", package, "application/octet-stream")},
    )
    assert "dify_pkg" in no_field.description

    bundle = await refused(
        api,
        "POST",
        "management/install/upload/bundle",
        files={"dify_bundle": ("dify_bundle", b"x", "application/octet-stream")},
        form={"verify_signature": "false"},
    )
    assert bundle.raised == "PluginDaemonBadRequestError" and "not supported" in bundle.description

    # over PLUGIN_MAX_PACKAGE_SIZE: a clear -400 as upstream, over a real socket, refused
    # before the body is read; nothing is stored
    before = await env.daemon.db.fetchval("SELECT count(*) FROM packages")
    too_big = await refused(
        api,
        "POST",
        "management/install/upload/package",
        files={"dify_pkg": ("dify_pkg", b"\0" * (4 * MAX_PACKAGE), "application/octet-stream")},
    )
    assert too_big.raised == "PluginDaemonBadRequestError"
    assert "exceeds the maximum" in too_big.description
    assert await env.daemon.db.fetchval("SELECT count(*) FROM packages") == before


# -- installed plugins and their declarations ------------------------------------------------


async def test_list_batch_missing_and_tool_and_model_declarations(
    api: DifyApi, env: DifyEnv
) -> None:
    calc, parrot = env.identifiers["acme/calc"], env.identifiers["acme/parrot"]
    listed = shaped(
        await call(
            api,
            "GET",
            "management/list",
            params={"page": 1, "page_size": 256, "response_type": "paged"},
        ),
        shapes.PluginList,
    )
    assert listed.total == 2
    by_id = {p.plugin_id: p for p in listed.list}
    assert set(by_id) == {"acme/calc", "acme/parrot"}
    entry = by_id["acme/calc"]
    assert entry.plugin_unique_identifier == calc and entry.version == "0.1.0"
    assert entry.checksum == calc.rsplit("@", 1)[1] and entry.name == "calc"
    assert entry.installation_id == entry.id and entry.runtime_type == "local"
    assert entry.source == "package"  # not installed through Dify: the default
    shaped(entry.declaration, shapes.PluginDeclaration)
    again = await call(api, "GET", "management/list", params={"page": 1, "page_size": 1})
    assert again["total"] == 2 and len(again["list"]) == 1
    assert by_id[again["list"][0]["plugin_id"]].installation_id == again["list"][0]["id"]

    batch = await call(
        api,
        "POST",
        "management/installation/fetch/batch",
        body={"plugin_ids": ["acme/parrot", "acme/nothing"]},
    )
    assert [shaped(b, shapes.PluginInstallation).plugin_id for b in batch] == ["acme/parrot"]
    assert (
        await call(api, "POST", "management/installation/fetch/batch", body={"plugin_ids": []})
        == []
    )

    newer = calc.replace(":0.1.0@", ":0.2.0@")
    absent = "acme/absent:1.0.0@" + "a" * 64
    missing = await call(
        api,
        "POST",
        "management/installation/missing",
        body={"plugin_unique_identifiers": [calc, newer, absent]},
    )
    assert [shaped(m, shapes.MissingDependency) for m in missing] == [
        shapes.MissingDependency(newer, calc),
        shapes.MissingDependency(absent, None),
    ]

    # tools: PluginToolManager.fetch_tool_providers / fetch_tool_provider
    tools = [
        shaped(t, shapes.ProviderRow)
        for t in await call(api, "GET", "management/tools", params={"page": 1, "page_size": 256})
    ]
    assert [(t.plugin_id, t.provider) for t in tools] == [("acme/calc", "calc")]
    declaration = tools[0].declaration
    assert declaration["identity"]["name"] == "calc"
    assert parse_asset_id(declaration["identity"]["icon"]) is not None
    assert {t["identity"]["name"] for t in declaration["tools"]} >= {"add", "divide"}
    one = await call(
        api, "GET", "management/tool", params={"provider": "calc", "plugin_id": "acme/calc"}
    )
    assert shaped(one, shapes.ProviderRow) == tools[0]
    for params, tenant in (
        ({"provider": "calc", "plugin_id": "acme/calc"}, OTHER_TENANT),
        ({"provider": "nope", "plugin_id": "acme/calc"}, TENANT),
    ):
        not_there = await refused(api, "GET", "management/tool", params=params, tenant=tenant)
        assert not_there.raised == "PluginNotFoundError"

    exists = await call(
        api,
        "POST",
        "management/tools/check_existence",
        body={
            "provider_ids": [
                {"plugin_id": "acme/calc", "provider_name": "calc"},
                {"plugin_id": "acme/calc", "provider_name": "other"},
                {"plugin_id": "acme/parrot", "provider_name": "parrot"},
            ]
        },
    )
    assert exists == [True, False, False]

    # models: a row's declaration is the model provider's, not the plugin's
    models = [
        shaped(m, shapes.ProviderRow)
        for m in await call(api, "GET", "management/models", params={"page": 1, "page_size": 256})
    ]
    assert [(m.plugin_id, m.provider, m.plugin_unique_identifier) for m in models] == [
        ("acme/parrot", "parrot", parrot)
    ]
    provider = models[0].declaration
    assert provider["provider"] == "parrot" and "author" not in provider
    assert "llm" in provider["supported_model_types"]
    assert {m["model"] for m in provider["models"]} >= {"parrot-chat", "parrot-embed"}
    assert parse_asset_id(provider["icon_small"]["en_US"]) is not None

    # another tenant sees nothing
    assert await call(api, "GET", "management/tools", tenant=OTHER_TENANT) == []
    empty = await call(
        api, "GET", "management/list", params={"page": 1, "page_size": 10}, tenant=OTHER_TENANT
    )
    assert empty == {"list": [], "total": 0}


def _provider_plugin(dest: Path, name: str, kind: str) -> Path:
    """A package with an agent strategy, a datasource or a trigger provider (never run)."""
    key, items_key, item_dir, provider_extra = {
        "agent_strategies": ("agent_strategies", "strategies", "strategies", ""),
        "datasources": (
            "datasources",
            "datasources",
            "datasources",
            "provider_type: online_drive\ncredentials_schema: []\n",
        ),
        "triggers": ("triggers", "events", "events", "subscription_schema: []\n"),
    }[kind]
    files = {
        "manifest.yaml": f"""\
            version: 0.1.0
            type: plugin
            author: acme
            name: {name}
            label:
              en_US: {name}
            description:
              en_US: A {kind} provider for the tests.
            icon: icon.svg
            created_at: "2025-01-01T00:00:00Z"
            resource:
              memory: 268435456
            plugins:
              {key}:
                - provider/{name}.yaml
            meta:
              version: 0.0.1
              arch: [amd64]
              runner:
                language: python
                version: "3.12"
                entrypoint: main
            """,
        "main.py": "",
        "_assets/icon.svg": ICON,
        f"provider/{name}.yaml": (
            f"identity:\n  author: acme\n  name: {name}\n  label:\n    en_US: {name}\n"
            f"  description:\n    en_US: {kind}\n  icon: icon.svg\n{provider_extra}"
            f"{items_key}:\n  - {item_dir}/one.yaml\n"
        ),
        f"{item_dir}/one.yaml": (
            "identity:\n  name: one\n  author: acme\n  label:\n    en_US: One\n"
            "  icon: icon.svg\ndescription:\n  en_US: One.\nparameters: []\n"
        ),
    }
    for path, content in files.items():
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(content))
    return dest


async def _installed_by_event(env: DifyEnv, package: bytes, tenant: str) -> str:
    """Install a package the way the log sees it: stored, then a ``plugin.installed`` event.

    These providers have no SDK runtime to start, and the adapter only reads declarations.
    """
    found = read_package(package, max_size=MAX_PACKAGE)
    await store_package(env.daemon.db, found)
    event = EventFactory("test")(
        Installed,
        request_id=f"synthetic-{found.name}",
        tenant_id=tenant,
        plugin_id=found.plugin_id,
        identifier=found.identifier,
        version=found.version,
        checksum=found.checksum,
        manifest=found.summary(),
        duration_ms=1.0,
    )
    await env.redis.hset(
        env.keys.installed, installed_field(tenant, found.plugin_id), found.identifier
    )
    await env.redis.xadd(env.keys.events, event_fields(event))
    return found.identifier


async def test_agent_strategy_datasource_and_trigger_declarations(
    api: DifyApi, env: DifyEnv, tmp_path: Path
) -> None:
    tenant = "tenant-providers"
    kinds = {
        "agent_strategies": ("thinker", "agent_strategy", "agent_strategies", "strategies"),
        "datasources": ("drive", "datasource", "datasources", "datasources"),
        "triggers": ("hooks", "trigger", "triggers", "events"),
    }
    for kind, (name, *_rest) in kinds.items():
        await _installed_by_event(
            env, build_package(_provider_plugin(tmp_path / name, name, kind)), tenant
        )
    with anyio.fail_after(20):
        while len((await call(api, "GET", "management/list", tenant=tenant))["list"]) < 3:
            await anyio.sleep(0.05)
    for name, single, plural, items in kinds.values():
        rows = await call(api, "GET", f"management/{plural}", tenant=tenant)
        shapes_by_kind: dict[str, type[shapes.ProviderRow]] = {
            "agent_strategy": shapes.AgentStrategyRow,
            "datasource": shapes.DatasourceRow,
        }
        shape = shapes_by_kind.get(single, shapes.ProviderRow)
        parsed = [shaped(r, shape) for r in rows]
        assert [(r.plugin_id, r.provider) for r in parsed] == [(f"acme/{name}", name)], plural
        declaration = parsed[0].declaration
        assert declaration["identity"]["name"] == name
        assert [i["identity"]["name"] for i in declaration[items]] == ["one"]
        assert parse_asset_id(declaration["identity"]["icon"]) is not None
        one = await call(
            api,
            "GET",
            f"management/{single}",
            params={"provider": name, "plugin_id": f"acme/{name}"},
            tenant=tenant,
        )
        assert one == rows[0]
        if single == "agent_strategy":
            assert rows[0]["meta"]["version"] == "0.0.1"
        if single == "datasource":
            assert parse_asset_id(declaration["datasources"][0]["identity"]["icon"]) is not None
        unknown = await refused(
            api,
            "GET",
            f"management/{single}",
            params={"provider": "x", "plugin_id": f"acme/{name}"},
            tenant=tenant,
        )
        assert unknown.raised == "PluginNotFoundError"
    listed = await call(api, "GET", "management/list", tenant=tenant)
    for entry in listed["list"]:
        shaped(entry["declaration"], shapes.PluginDeclaration)


# -- install tasks, upgrade, uninstall --------------------------------------------------------


async def test_install_upgrade_tasks_and_uninstall(api: DifyApi, tmp_path: Path) -> None:
    tenant = "tenant-tasks"
    v1, v2 = build_tester(tmp_path, "0.1.0"), build_tester(tmp_path, "0.2.0")
    first = (await upload(api, v1))["unique_identifier"]
    second = (await upload(api, v2))["unique_identifier"]

    # the console sends metas [{}] whatever the number of identifiers
    started = shaped(
        await call(
            api,
            "POST",
            "management/install/identifiers",
            body={"plugin_unique_identifiers": [first], "source": "package", "metas": [{}]},
            tenant=tenant,
        ),
        shapes.InstallStartResponse,
    )
    assert not started.all_installed and started.task_id
    task = await until_done(api, started.task_id, tenant)
    assert task.status == "success", task
    assert (task.total_plugins, task.completed_plugins) == (1, 1)
    item = task.plugins[0]
    assert (item.plugin_unique_identifier, item.plugin_id, item.status) == (
        first,
        "acme/mgmt-tester",
        "success",
    )
    assert item.labels["en_US"] == "mgmt-tester" and parse_asset_id(item.icon) is not None
    assert item.source == "package"

    listed = await call(api, "GET", "management/list", tenant=tenant)
    assert [p["plugin_unique_identifier"] for p in listed["list"]] == [first]
    installation = listed["list"][0]["installation_id"]

    again = await call(
        api,
        "POST",
        "management/install/identifiers",
        body={"plugin_unique_identifiers": [first], "source": "package", "metas": []},
        tenant=tenant,
    )
    assert again == {"all_installed": True, "task_id": ""}

    # upgrade: one install of the new version; the installation keeps its id
    upgrade = {
        "original_plugin_unique_identifier": first,
        "new_plugin_unique_identifier": second,
        "source": "marketplace",
        "meta": {"plugin_unique_identifier": second},
    }
    started = shaped(
        await call(api, "POST", "management/install/upgrade", body=upgrade, tenant=tenant),
        shapes.InstallStartResponse,
    )
    assert (await until_done(api, started.task_id, tenant)).status == "success"
    listed = await call(api, "GET", "management/list", tenant=tenant)
    (entry,) = listed["list"]
    assert (entry["plugin_unique_identifier"], entry["version"]) == (second, "0.2.0")
    assert entry["installation_id"] == installation
    assert (entry["source"], entry["meta"]) == ("marketplace", upgrade["meta"])
    done = await call(api, "POST", "management/install/upgrade", body=upgrade, tenant=tenant)
    assert done == {"all_installed": True, "task_id": ""}
    elsewhere = await refused(
        api, "POST", "management/install/upgrade", body=upgrade, tenant="tenant-elsewhere"
    )
    assert elsewhere.raised == "PluginDaemonNotFoundError"  # nothing to upgrade there
    same = await refused(
        api,
        "POST",
        "management/install/upgrade",
        body={**upgrade, "new_plugin_unique_identifier": first},
        tenant=tenant,
    )
    assert same.raised == "PluginDaemonBadRequestError"

    tasks = await call(
        api, "GET", "management/install/tasks", params={"page": 1, "page_size": 10}, tenant=tenant
    )
    assert [shaped(t, shapes.InstallTask).id for t in tasks] == [started.task_id, task.id]
    assert await call(
        api, "POST", f"management/install/tasks/{task.id}/delete/{first}", tenant=tenant
    )
    gone = await refused(api, "GET", f"management/install/tasks/{task.id}", tenant=tenant)
    assert gone.raised == "PluginDaemonNotFoundError"  # its only plugin had succeeded
    assert await call(
        api, "POST", f"management/install/tasks/{started.task_id}/delete", tenant=tenant
    )
    assert await call(api, "POST", "management/install/tasks/delete_all", tenant=tenant)
    assert await call(api, "GET", "management/install/tasks", tenant=tenant) == []

    # uninstall by installation id: `true`, and the list no longer shows it
    body = {"plugin_installation_id": installation}
    assert await call(api, "POST", "management/uninstall", body=body, tenant=tenant) is True
    assert await call(api, "GET", "management/list", tenant=tenant) == {"list": [], "total": 0}
    assert await call(api, "POST", "management/uninstall", body=body, tenant=tenant) is True


async def test_install_requests_that_are_refused(api: DifyApi, env: DifyEnv) -> None:
    calc = env.identifiers["acme/calc"]
    events_before = await env.redis.xlen(env.keys.install)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"source": "package"}, "PluginDaemonBadRequestError", "plugin_unique_identifiers"),
        (
            {"plugin_unique_identifiers": [calc], "source": "somewhere"},
            "PluginDaemonBadRequestError",
            "source",
        ),
        (
            {"plugin_unique_identifiers": ["acme/calc"], "source": "package"},
            "PluginUniqueIdentifierError",
            "malformed plugin identifier",
        ),
        (
            {"plugin_unique_identifiers": ["acme/nowhere:1.0.0@" + "b" * 64], "source": "package"},
            "PluginDaemonNotFoundError",
            "upload it first",
        ),
        (
            {"plugin_unique_identifiers": [calc, calc], "source": "package"},
            "PluginDaemonBadRequestError",
            "once",
        ),
    ]
    for body, raised, says in cases:
        error = await refused(
            api, "POST", "management/install/identifiers", body=body, tenant="tenant-refused"
        )
        assert error.raised == raised and says in error.description, (body, error)
    assert await env.redis.xlen(env.keys.install) == events_before  # nothing was published


async def test_malformed_requests_get_a_clear_400(api: DifyApi) -> None:
    for path in ("management/uninstall", "management/installation/fetch/batch"):
        response = await api.http.post(
            f"/plugin/{TENANT}/{path}",
            content=b"{not json",
            headers={"X-Api-Key": api.key, "Content-Type": "application/json"},
        )
        assert response.status_code == 200
        envelope = response.json()
        assert envelope["code"] == -400 and envelope["data"] is None
        detail = json.loads(envelope["message"])
        assert detail["error_type"] == "PluginDaemonBadRequestError"
        assert "not JSON" in detail["message"]
    wrong_type = await refused(
        api, "POST", "management/uninstall", body={"plugin_installation_id": 7}
    )
    assert "plugin_installation_id" in wrong_type.description
    empty = await refused(api, "POST", "management/installation/missing")
    assert "JSON body is required" in empty.description
    for params in ({"page": 0}, {"page_size": 1000}, {"page": "one"}):
        bad = await refused(api, "GET", "management/list", params=params)
        assert bad.raised == "PluginDaemonBadRequestError", params


async def test_unknown_routes(api: DifyApi) -> None:
    for method, path in (
        ("GET", f"/plugin/{TENANT}/management/nothing"),
        ("POST", f"/plugin/{TENANT}/nothing/at/all"),
        ("GET", f"/plugin/{TENANT}/management/uninstall"),  # a POST route
    ):
        response = await api.http.request(method, path, headers={"X-Api-Key": api.key})
        assert response.status_code == 404, (method, path)
        detail = json.loads(response.json()["message"])
        assert detail["error_type"] == "PluginDaemonNotFoundError"
    response = await api.http.get("/nothing", headers={"X-Api-Key": api.key})
    assert response.status_code == 404


async def test_no_endpoints_and_no_remote_debugging(api: DifyApi) -> None:
    assert await call(api, "GET", "endpoint/list", params={"page": 1, "page_size": 10}) == []
    assert (
        await call(
            api,
            "GET",
            "endpoint/list/plugin",
            params={"plugin_id": "acme/calc", "page": 1, "page_size": 10},
        )
        == []
    )
    setup = await refused(api, "POST", "endpoint/setup", body={})
    assert setup.raised == "PluginDaemonBadRequestError"
    assert "plugin_unique_identifier" in setup.description
    debugging = await refused(api, "POST", "debugging/key", body={})
    assert debugging.raised == "PluginDaemonBadRequestError"
    assert "not supported by plugind" in debugging.description
