"""The bench's pure parts: round order, medians over rounds, same-run ratios, the report.

The lab figures are the primary table, so a ratio against the wrong baseline or a table that
names the wrong setting would mislead every reader of docs/PERFORMANCE.md.
"""

from __future__ import annotations

from typing import Any

from bench import lab_chains, report
from bench.run import setting_command


def _transfer(mb_s: float, cpu: dict[str, float]) -> dict[str, Any]:
    per = dict(cpu)
    per["total"] = sum(cpu.values())
    return {
        "mb_per_s": mb_s,
        "cpu_s_per_gib": per,
        "processes": [{"role": "sshd", "cmd": "sshd: root", "core_pct": 50.0}],
        "context_core_pct": {"client": 10.0, "sink": 5.0},
    }


def _chain(mb_s: float, cpu: float, p50: float, rate: float) -> dict[str, Any]:
    return {
        "latency": {"samples_ms": [p50, p50, p50 * 2], "errors": {}},
        "down": _transfer(mb_s, {"sshd": cpu / 2, "exit": cpu / 2}),
        "up": _transfer(mb_s / 2, {"sshd": cpu, "exit": cpu}),
        "rate": {
            "per_second": rate,
            "cpu_ms_per_stream": 1.0,
            "client_core_pct": 20.0,
            "errors": {},
            "parallel": 4,
        },
    }


def _rounds() -> list[dict[str, Any]]:
    speeds = ((100.0, 200.0), (300.0, 200.0), (200.0, 100.0))
    return [
        {
            "round": i + 1,
            "results": {
                "relay-openssh": _chain(relay, 4.0, 3.0, 600.0 + i),
                "old-chain": _chain(old, 8.0, 2.0, 1200.0),
            },
        }
        for i, (relay, old) in enumerate(speeds)
    ]


def test_round_order_rotates_so_each_chain_leads_once() -> None:
    names = ["a", "b", "c"]
    orders = [lab_chains.round_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert lab_chains.round_order([], 2) == []


def test_aggregate_takes_medians_over_rounds() -> None:
    agg = lab_chains.aggregate(_rounds(), ["relay-openssh", "old-chain"])
    assert agg["relay-openssh"]["down"]["mb_per_s"] == 200.0
    assert agg["relay-openssh"]["down"]["mb_per_s_runs"] == [100.0, 300.0, 200.0]
    assert agg["old-chain"]["down"]["mb_per_s"] == 200.0
    assert agg["relay-openssh"]["rate"]["per_second"] == 601.0
    assert agg["relay-openssh"]["latency_p50_ms"] == 3.0
    assert agg["relay-openssh"]["down"]["cpu_s_per_gib"]["total"] == 4.0


def test_ratios_are_against_each_baseline_of_the_same_run() -> None:
    agg = lab_chains.aggregate(_rounds(), ["relay-openssh", "old-chain"])
    assert lab_chains.figure(agg, "relay-openssh", "cpu_down") == 4.0
    assert lab_chains.ratio(lab_chains.figure(agg, "relay-openssh", "rate"), 1200.0) == (
        601.0 / 1200.0
    )
    assert lab_chains.ratio(1.0, None) is None
    assert lab_chains.ratio(1.0, 0.0) is None
    table = lab_chains.ratio_table(agg, ["relay-openssh", "old-chain"])
    # MB/s down 1.00, up 1.00, CPU down 0.50, CPU up 0.50, setup p50 1.50, streams/s 0.50
    assert table[2] == "| relay-openssh / old-chain | 1.00 | 1.00 | 0.50 | 0.50 | 1.50 | 0.50 |"
    assert lab_chains.ratio_table(agg, ["relay-openssh"]) == []


def test_setting_command_reproduces_one_setting_without_side_effects() -> None:
    argv = ["--full", "--update-docs", "--out", "/tmp/x", "--settings", "lab,loopback"]
    cmd = setting_command([*argv, "--set", "lab_rounds=3"], "lab")
    assert cmd.endswith("-m bench --full --set lab_rounds=3 --settings lab")
    assert "--update-docs" not in cmd and "/tmp/x" not in cmd


def test_report_puts_the_lab_first_and_names_each_setting() -> None:
    meta: dict[str, Any] = {
        "run_id": "RUN",
        "command": ".venv/bin/python -m bench --quick",
        "setting_commands": {
            "lab": ".venv/bin/python -m bench --quick --settings lab",
            "loopback": ".venv/bin/python -m bench --quick --settings loopback",
        },
        "settings": ["lab", "loopback"],
        "started": "2000-01-01T00:00:00+00:00",
        "loadavg_start": ["0", "0", "0"],
        "nproc": 2,
        "kernel": "6.1",
        "python": "3.11.2",
        "params": {},
    }
    lab_meta = {
        "command": meta["setting_commands"]["lab"],
        "cpus": 2,
        "kernel": "6.1",
        "python": "3.11.2",
        "openssh": "OpenSSH_9.2p1",
        "dante": "Dante v1.4.2",
        "commit": "abc1234",
        "load_before": "0.1",
        "size_mib": 32,
        "rounds": 3,
        "latency_count": 20,
        "rate_seconds": 2.0,
        "rate_parallel": 4,
        "chains": ["relay-openssh", "old-chain"],
        "failure": None,
    }
    rounds = _rounds()
    results = {
        "meta": meta,
        "lab": {
            "meta": lab_meta,
            "rounds": rounds,
            "medians": lab_chains.aggregate(rounds, lab_meta["chains"]),
        },
    }
    text = report.markdown(results, report.figures(results), [])
    lab_at = text.index("Namespace lab (primary setting)")
    assert lab_at < text.index("Loopback (second setting)")
    assert "Reproduce: `.venv/bin/python -m bench --quick --settings lab`" in text
    assert "Reproduce: `.venv/bin/python -m bench --quick --settings loopback`" in text
    assert "3 round(s)" in text and "medians over rounds" in text
    assert "| relay-openssh | 200 (100, 300, 200) |" in text
