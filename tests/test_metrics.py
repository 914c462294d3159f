"""``/metrics`` in Prometheus conventions, fed from the hot path, and what ``deploy/`` builds on it.

Two nodes (one serving HTTP, one worker only): the api node's ``/metrics`` holds both nodes'
series, labelled by ``node``; the text parses as the Prometheus exposition format; counters end
in ``_total``, durations are histograms in seconds; the numbers are those of the work done. The
alert rules and the Grafana dashboard in ``deploy/`` load, cover the seed's thresholds, and name
only metrics plugind exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from e2e import EXAMPLE_CALC
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from plugind.client import Client
from plugind.config import Settings
from plugind.daemon import running_daemon
from plugind.messages import Installed, TaskFailed, TaskSucceeded
from plugind.package.difypkg import build_package

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "plugind-alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "plugind-dashboard.json"
NAME = re.compile(r"^plugind_[a-z][a-z0-9_]*$")

EXPECTED = {  # family (as the parser names it) -> type
    "plugind_up": "gauge",
    "plugind_tasks": "counter",
    "plugind_task_duration_seconds": "histogram",
    "plugind_installs": "counter",
    "plugind_install_duration_seconds": "histogram",
    "plugind_plugin_processes": "gauge",
    "plugind_plugin_in_flight": "gauge",
    "plugind_plugin_restarts": "counter",
    "plugind_plugin_rss_bytes": "gauge",
    "plugind_consumer_in_flight": "gauge",
    "plugind_takeovers": "counter",
    "plugind_stream_length": "gauge",
    "plugind_stream_pending": "gauge",
    "plugind_stream_lag": "gauge",
    "plugind_dead_letters": "counter",
    "plugind_projector_lag": "gauge",
    "plugind_projector_commit_duration_seconds": "histogram",
    "plugind_projector_events": "counter",
    "plugind_http_requests": "counter",
    "plugind_http_request_duration_seconds": "histogram",
    "plugind_health_checks": "counter",
    "plugind_log_messages": "counter",
    "plugind_dependency_outages": "counter",
    "plugind_node_cpu_seconds": "counter",
    "plugind_node_memory_bytes": "gauge",
    "plugind_node_memory_limit_bytes": "gauge",
    "plugind_node_cpus": "gauge",
    "plugind_nodes": "gauge",
}


def _families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sum(family: Metric, sample: str, **labels: str) -> float:
    return sum(
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _task(client: Client, n: int, tenant: str = "default") -> Any:
    return client.invoke_tool(
        "acme/calc", "calc", "add", {"a": n, "b": 1}, tenant_id=tenant, user_id="u"
    )


async def test_metrics_of_every_node_in_prometheus_conventions(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    api = replace(settings, node="node-api", plugin_dir=tmp_path / "api")
    worker = replace(settings, node="node-worker", plugin_dir=tmp_path / "worker")
    async with (
        running_daemon(api, shutdown_grace_s=5, report_interval_s=0.2) as a,
        running_daemon(worker, ("worker",), shutdown_grace_s=5, report_interval_s=0.2),
    ):
        client = Client(redis, a.keys)
        installed = await client.wait(await client.install(build_package(EXAMPLE_CALC)), 300)
        assert isinstance(installed, Installed), installed
        rids = [await _task(client, n) for n in range(30)]
        for rid in rids:
            assert isinstance(await client.wait(rid, 60), TaskSucceeded)
        failed = await client.wait(await _task(client, 0, tenant="nobody"), 60)
        assert isinstance(failed, TaskFailed) and failed.error.code == "not_installed"

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a.ports['api']}") as http:
            assert (await http.get("/health")).status_code == 200
            with anyio.fail_after(20):  # the worker's numbers come through Redis, 0.2 s late
                while True:
                    text = (await http.get("/metrics")).text
                    families = _families(text)
                    tasks = families["plugind_tasks"]
                    nodes = {s.labels["node"] for s in tasks.samples}
                    if _sum(tasks, "plugind_tasks_total") == 31 and "node-worker" in {
                        s.labels["node"] for s in families["plugind_node_cpus"].samples
                    }:
                        break
                    await anyio.sleep(0.1)

    # the exposition format, and the conventions
    for name, family in families.items():
        assert NAME.match(name), name
        assert family.documentation, name
        assert "_ms" not in name, name
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert names <= {f"{name}_total"}, (name, names)
        elif family.type == "histogram":
            assert name.endswith("_seconds"), name
            assert names <= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}, names
            assert any(s.labels.get("le") == "+Inf" for s in family.samples), name
        else:
            assert family.type == "gauge" and not name.endswith("_total"), name
    assert {n: families[n].type for n in EXPECTED if n in families} == EXPECTED

    # fed by the work itself, per node
    assert _sum(tasks, "plugind_tasks_total", outcome="succeeded", plugin="acme/calc") == 30
    assert _sum(tasks, "plugind_tasks_total", outcome="failed") == 1
    assert nodes <= {"node-api", "node-worker"}
    durations = families["plugind_task_duration_seconds"]
    assert _sum(durations, "plugind_task_duration_seconds_count") == 31
    assert 0 < _sum(durations, "plugind_task_duration_seconds_sum") < 31 * 10
    installs = families["plugind_installs"]
    assert _sum(installs, "plugind_installs_total", outcome="installed", node="node-api") == 1
    assert _sum(families["plugind_projector_events"], "plugind_projector_events_total") >= 62
    assert _sum(families["plugind_plugin_processes"], "plugind_plugin_processes") >= 1
    requests = families["plugind_http_requests"]
    assert _sum(requests, "plugind_http_requests_total", route="/health", status="200") >= 1
    assert _sum(families["plugind_node_memory_bytes"], "plugind_node_memory_bytes") > 0
    assert f'plugind_stream_pending{{group="workers",stream="{a.keys.tasks}"}} 0.0' in text

    exported = set().union(*(_sample_names(f) for f in families.values()))
    _check_alert_rules(exported)
    _check_dashboard(exported)


def _sample_names(family: Metric) -> set[str]:
    """What a query may name of ``family``, whether or not it has a sample yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for suffix in ("", *suffixes.get(family.type, ()))}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(plugind_[a-z0-9_]+)", expr))


def _check_alert_rules(exported: set[str]) -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule
        assert rule["annotations"]["summary"], rule
        missing = _metric_names(rule["expr"]) - exported
        assert not missing, (rule["alert"], missing)
    by_name = {r["alert"]: " ".join(r["expr"].split()) for r in rules}
    # the seed's thresholds
    assert "plugind_node_cpu_seconds_total" in by_name["PlugindNodeCpuHigh"]
    assert by_name["PlugindNodeCpuHigh"].endswith("> 0.8")
    assert by_name["PlugindNodeMemoryHigh"].endswith("> 0.85")
    assert 'result="failed"' in by_name["PlugindHealthCheckFailing"]
    assert by_name["PlugindHealthCheckFailing"].endswith("> 3")
    assert 'level=~"error|critical"' in by_name["PlugindErrorLogs"]
    promtool = shutil.which("promtool")
    if promtool:  # the real check, where Prometheus's tool is installed
        subprocess.run([promtool, "check", "rules", str(ALERTS)], check=True)


def _check_dashboard(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "plugind"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    referenced = set().union(*(_metric_names(e) for e in exprs))
    assert not referenced - exported, referenced - exported
    # every family an operator needs is on a panel
    for family in EXPECTED:
        if family not in ("plugind_up", "plugind_dependency_outages", "plugind_node_cpus"):
            assert any(name.startswith(family) for name in referenced), family
    thresholds = {
        p["title"]: p["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"]
        for p in panels
        if "thresholds" in p["fieldConfig"]["defaults"]
    }
    assert thresholds["CPU used by node"] == 0.8
    assert thresholds["Memory used by node"] == 0.85
    assert thresholds["Failed health checks (per minute)"] == 3
