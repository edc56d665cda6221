"""deploy/monitoring: promtool accepts the rules and the scrape config, the rules' own unit
tests pass, and the rules and the Grafana dashboard use only metric names that running
daemons export (scraped over HTTP here, not copied from the source)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from python_socks.async_.asyncio import Proxy

from relay.config.values import HostPort
from relay.exit.daemon import RelayExit
from relay.exit.supervisor import Supervisor
from relay.worker.daemon import RelayWorker
from tests.support.helpers import Servers, echo_handler, exit_settings, wait_for, worker_settings
from tests.support.yamlfile import load_yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

#: The alerts the operators asked for, by what they watch.
REQUIRED_ALERTS = {
    "RelayExitDown",
    "RelayReconnectStorm",
    "RelayResumeFailures",
    "RelayAuthFailures",
    "RelayPolicyDenialsSpike",
    "RelayHeartbeatRttHigh",
}
#: Metric families the dashboard must show (new metrics may join later).
DASHBOARD_FAMILIES = {
    "relay_info",
    "relay_streams_active",
    "relay_streams",
    "relay_bytes",
    "relay_carriers_active",
    "relay_carriers",
    "relay_ssh_connections_active",
    "relay_ssh_connects",
    "relay_reconnects",
    "relay_heartbeat_rtt_seconds",
    "relay_handshake_seconds",
    "relay_auth_failures",
    "relay_policy_denials",
    "relay_protocol_errors",
    "relay_limit_hits",
    "relay_resumes",
    "relay_parked_sessions",
    "relay_replay_buffer_bytes",
    "relay_frames",
    "relay_credit_stalls",
}
#: Series Prometheus makes itself, not the daemons.
PROMETHEUS_SERIES = {"up"}

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool missing (Debian package prometheus): run scripts/install-debs")
    return path


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names, durations or numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors
    expr = re.sub(r"\boffset\s+[0-9a-z]+", " ", expr)
    expr = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    names = set()
    for match in re.finditer(r"(?<![0-9.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function
        if word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_names_extracts_selectors_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(relay_x_bucket{job="a", le!="1"}[5m])))'
        " > 1 and up == 0 or absent(relay_y_total) unless foo offset 1h"
    )
    assert metric_names(expr) == {"relay_x_bucket", "up", "relay_y_total", "foo"}


@pytest.fixture
async def exported() -> AsyncIterator[set[str]]:
    """Sample names that a running exit and a running worker expose on /metrics."""
    relay_exit = RelayExit(exit_settings(metrics=HostPort("127.0.0.1", 0)))
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(
            None, relay_exit.address, no_socks_auth=True, metrics=HostPort("127.0.0.1", 0)
        )
    )
    await worker.start()
    try:
        names: set[str] = set()
        for daemon in (relay_exit, worker):
            address = daemon.metrics_address
            assert address is not None
            text = await http_get(address, "/metrics")
            for family in text_string_to_metric_families(text):
                names.update(sample_names(family.name, family.type))
        # The supervisor of relay-exit --workers adds its own families to the group's page.
        for family in Supervisor([], 2, "127.0.0.1", 0, None).registry.collect():
            names.update(sample_names(family.name, family.type))
        yield names
    finally:
        await worker.stop()
        await relay_exit.stop()


def sample_names(family: str, kind: str) -> set[str]:
    """Series names a family exposes (counters end in _total, histograms have three)."""
    if kind == "counter":
        return {family + "_total"}
    if kind == "histogram":
        return {family + suffix for suffix in ("_bucket", "_sum", "_count")}
    if kind == "summary":
        return {family, family + "_sum", family + "_count"}
    return {family}


async def http_get(address: tuple[str, int], path: str) -> str:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def test_promtool_accepts_the_rules() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", out.stdout)
    assert found, out.stdout
    assert int(found.group(1)) == len(alert_rules())


def test_alert_unit_tests_pass() -> None:
    """alerts_test.yml: each alert fires on its situation and not on its look-alike."""
    out = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_accepts_the_scrape_config() -> None:
    out = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {job["job_name"] for job in load_yaml(MONITORING / "prometheus.yml")["scrape_configs"]}
    assert jobs == {"relay-exit", "relay-worker"}


def test_every_requested_alert_exists_with_severity_and_text() -> None:
    rules = alert_rules()
    missing = REQUIRED_ALERTS - {rule["alert"] for rule in rules}
    assert not missing
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


async def test_rules_use_only_exported_metrics(exported: set[str]) -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - exported - PROMETHEUS_SERIES
        assert not unknown, f"{rule['alert']} uses {sorted(unknown)}, not exported"


async def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        unknown = metric_names(expr) - exported - PROMETHEUS_SERIES
        assert not unknown, f"dashboard query {expr!r} uses {sorted(unknown)}"
    # the chain's health at a glance: every one of these has a panel
    shown = set().union(*(metric_names(e) for e in exprs))
    shown_families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in shown}
    missing = DASHBOARD_FAMILIES - shown_families
    assert not missing, f"not on the dashboard: {sorted(missing)}"


def test_dashboard_is_importable_grafana_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    for panel in doc["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__interval"}
            assert used <= variables, (panel["title"], used)


async def test_metrics_doc_lists_what_the_daemons_export(exported: set[str]) -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    documented = set(re.findall(r"`(relay_[a-z0-9_]+)`", text))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert documented <= exported | families, sorted(documented - exported - families)
    assert families <= documented, (
        f"undocumented in docs/METRICS.md: {sorted(families - documented)}"
    )


def test_dashboard_panels_do_not_overlap() -> None:
    doc = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in doc["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


async def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(await http_get(address, "/metrics")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_carrier_metrics_count_workers_not_streams() -> None:
    """What the dashboard's carrier, frame and credit-stall panels rely on, scraped over HTTP:
    a worker's streams share its --carriers carriers, frames move both ways, and a stream
    whose destination stops reading stalls on credit."""
    servers = Servers()
    echo_port = await servers.start(echo_handler)
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # never reads: the stream's window fills up

    sink_port = await servers.start(sink)
    relay_exit = RelayExit(exit_settings(metrics=HostPort("127.0.0.1", 0)))
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(
            None,
            relay_exit.address,
            no_socks_auth=True,
            heartbeat=1.0,
            carriers=2,
            replay_buffer=64 * 1024,
            metrics=HostPort("127.0.0.1", 0),
        )
    )
    await worker.start()
    writers: list[asyncio.StreamWriter] = []
    try:
        client = worker.exits[relay_exit.address]
        assert await wait_for(lambda: len(client.carriers) == 2)
        proxy = f"socks5://{worker.address[0]}:{worker.address[1]}"
        for n in range(6):
            sock = await Proxy.from_url(proxy).connect("127.0.0.1", echo_port)
            reader, writer = await asyncio.open_connection(sock=sock)
            writers.append(writer)
            writer.write(b"line %d\n" % n)
            assert await asyncio.wait_for(reader.readline(), 5) == b"line %d\n" % n
        sock = await Proxy.from_url(proxy).connect("127.0.0.1", sink_port)
        _, upload = await asyncio.open_connection(sock=sock)
        writers.append(upload)
        chunk = b"x" * 65536
        with pytest.raises(asyncio.TimeoutError):
            for _ in range(4096):  # 256 MiB: far more than the socket buffers hold
                upload.write(chunk)
                await asyncio.wait_for(upload.drain(), 1.0)

        assert worker.metrics_address and relay_exit.metrics_address
        worker_page = await scrape(worker.metrics_address)
        exit_page = await scrape(relay_exit.metrics_address)
        for page in (worker_page, exit_page):
            assert page[("relay_carriers_active", ())] == 2
            assert page[("relay_streams_active", ())] == 7
            assert page[("relay_frames_total", (("direction", "in"),))] >= 7
            assert page[("relay_frames_total", (("direction", "out"),))] >= 7
        assert worker_page[("relay_credit_stalls_total", ())] >= 1
    finally:
        done.set()
        for writer in writers:
            writer.transport.abort()
        await worker.stop()
        await relay_exit.stop()
        await servers.close()
