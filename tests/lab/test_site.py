"""The multi-node site lab keeps its promises: who reaches whom, what the firewall forgets, and
that nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.support.site as site_mod
from tests.support import fixtures as lab_fixtures
from tests.support.netns import PREFIX, LabError, cleanup_stale_namespaces, nsclient_argv
from tests.support.site import Site

root_netns = lab_fixtures.root_netns


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture
def site(tmp_path: Path, root_netns: None) -> Iterator[Site]:
    the_site = Site.create(tmp_path / "site", workers=3, logins=2, exits=2)
    try:
        yield the_site
    finally:
        the_site.close()


def _connect_all(
    site: Site, attempts: list[tuple[str, str, int]], timeout: float = 4
) -> dict[tuple[str, str, int], dict[str, Any]]:
    """One TCP connect per (ns, host, port), all at once; nsclient's result for each. The
    timeout lets a lost first SYN be sent again (after 1 s) on a loaded machine."""
    procs = [
        site.spawn(
            ns,
            nsclient_argv("connect", host, str(port), "--timeout", str(timeout)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns, host, port in attempts
    ]
    results = {}
    for attempt, proc in zip(attempts, procs):
        out, err = proc.communicate(timeout=timeout + 30)
        assert out.strip(), f"{attempt}: no output, stderr: {err}"
        results[attempt] = json.loads(out.strip().splitlines()[-1])
    return results


def test_who_reaches_whom(site: Site) -> None:
    assert len(site.workers) == len(site.worker_ips) == 3
    assert len(site.logins) == len(site.login_ips) == 2
    assert len(set(site.namespaces)) == len(site.namespaces) == 3 + 2 + 3
    servers = [(ns, "0.0.0.0", 22) for ns in site.logins]
    servers += [(site.workers[1], site.worker_ips[1], 22)]
    servers += [(site.outside, "0.0.0.0", 80), (site.outside, "0.0.0.0", 8080)]
    servers += [(site.outside, site.sink_ip, 9000)]
    procs = [
        site.spawn(ns, nsclient_argv("echo-server", host, str(port))) for ns, host, port in servers
    ]
    for (ns, _, port), proc in zip(servers, procs):
        site.wait_listening(ns, port, proc=proc)
    w0, w1, w2 = site.workers
    # A compute node that routes via a login node gets nowhere either: the login node does not
    # forward, and nothing beyond it knows the compute network.
    site.run(w2, ["ip", "route", "add", "default", "via", site.login_ips[0]])

    reach = [(w, ip, 22) for w in site.workers for ip in site.login_ips]
    reach += [(site.logins[0], site.exit_ips[0], 80), (site.logins[1], site.exit_ips[1], 80)]
    reach += [(site.outside, site.sink_ip, 9000)]
    # No route out of the compute network: refused at once.
    unroutable = [(w0, site.exit_ips[0], 80), (w1, site.exit_ips[1], 80)]
    unroutable += [(w0, site.sink_ip, 9000), (w1, site.login_uplink_ips[0], 22)]
    # Isolated bridge ports; the login node as a router.
    blocked = [(w0, site.worker_ips[1], 22), (w2, site.exit_ips[0], 80)]
    # Silently dropped by the firewall: no RST, no ICMP.
    firewalled = [(site.logins[0], site.exit_ips[0], 8080), (site.logins[1], site.sink_ip, 9000)]
    firewalled += [(site.outside, site.login_uplink_ips[0], 22)]  # nothing opened inwards
    results = _connect_all(site, reach + unroutable + blocked + firewalled)

    for attempt in reach:
        assert results[attempt]["connected"], (attempt, results[attempt])
    for attempt in unroutable + blocked + firewalled:
        assert not results[attempt]["connected"], (attempt, results[attempt])
    for attempt in unroutable:
        assert "unreachable" in results[attempt]["error"], (attempt, results[attempt])
    for attempt in firewalled:
        assert results[attempt]["error"] == "timeout", (attempt, results[attempt])
    # Only dropped *new* connections so far: none of them counts as invalid.
    assert site.invalid_drops() == 0


def test_forget_connections_black_holes_a_live_connection(site: Site) -> None:
    site.start_echo_server(site.outside, site.exit_ips[1], 80)
    assert site.forget_connections() == 0  # nothing tracked yet: no error
    client = site.spawn_client(
        site.logins[1], site.exit_ips[1], 80, "--wait-stdin", "--timeout", "1"
    )
    assert client.stdout is not None and client.stdin is not None
    assert json.loads(client.stdout.readline()) == {"event": "first", "first": True}
    assert site.conntrack_count(80) == 1
    assert site.conntrack_count(443) == 0
    drops_before = site.invalid_drops()
    assert site.forget_connections() == 1
    assert site.conntrack_count() == 0
    client.stdin.write("go\n")
    client.stdin.flush()
    result = site.client_result(client, timeout=30)
    assert result["after_idle"] is False, result
    assert result["error"] == "timeout", result  # black hole: no RST, no FIN
    assert site.invalid_drops() > drops_before
    assert site.conntrack_count() == 0  # the dropped packets did not re-create the entry


def test_close_deletes_every_namespace(tmp_path: Path, root_netns: None) -> None:
    site = Site.create(tmp_path / "a", workers=2, logins=1, exits=1)
    assert set(site.namespaces) <= _namespaces()
    proc = site.spawn(site.workers[0], ["sleep", "60"])
    site.close()
    site.close()  # idempotent
    assert proc.returncode is not None
    assert not set(site.namespaces) & _namespaces()

    with pytest.raises(RuntimeError, match="inside"), Site.create(tmp_path / "b") as site:
        assert len(site.namespaces) == 8 + 2 + 3
        raise RuntimeError("inside")
    assert not set(site.namespaces) & _namespaces()


def test_failed_setup_deletes_every_namespace(
    tmp_path: Path, root_netns: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = f"{PREFIX}{os.getpid()}-"
    assert not {ns for ns in _namespaces() if ns.startswith(ours)}
    monkeypatch.setattr(site_mod, "_ruleset", lambda timeout: "table inet hrlab { bogus }\n")
    with pytest.raises(LabError, match="nft -f"):
        Site.create(tmp_path / "site", workers=2, logins=1)
    assert not {ns for ns in _namespaces() if ns.startswith(ours)}


def test_stale_site_namespaces_are_cleaned_up(root_netns: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"{PREFIX}{dead.pid}-abcdef-{role}" for role in ("w12", "l0", "sw")]
    try:
        for ns in stale:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        assert set(stale) <= set(cleanup_stale_namespaces())
    finally:
        for ns in stale:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    assert not set(stale) & _namespaces()
