"""Turn a bench run's results.json into summary.md, PNG plots and the docs section.

python -m bench.report bench/results/<run>/ [--update-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ("direct-iperf3", "direct", "old-chain", "old-chain-gcm", "relay", "pproxy")
OLD, OLD_GCM, RELAY, DIRECT = "old-chain", "old-chain-gcm", "relay", "direct"
KIB = 1024


def _ordered(names: Any) -> list[str]:
    names = list(names)
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(samples)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def f(x: float, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


# -- figures -----------------------------------------------------------------------------------
def figures(results: dict[str, Any]) -> dict[str, Any]:
    """Medians, min/max and percentiles per chain; ratios; goal verdicts."""
    fig: dict[str, Any] = {"bulk": {}, "latency": {}, "wan": {}, "rate": {}, "idle": {}}
    runs = results.get("bulk", {}).get("runs", {})
    for chain, dirs in runs.items():
        entry = {}
        for direction, rs in dirs.items():
            entry[direction] = {
                "mb_s": spread([r["mb_s"] for r in rs]),
                "cpu_per_gib": spread([r["cpu_per_gib"] for r in rs]),
                "checked": sum(1 for r in rs if r.get("ok")),
                "runs": len(rs),
                "cpu_roles": {
                    role: statistics.median(r["cpu"][role] for r in rs)
                    / (results["bulk"]["size"] / (1 << 30))
                    for role in (rs[0].get("cpu") or {})
                },
            }
        fig["bulk"][chain] = entry
    for key in ("latency", "wan"):
        for chain, e in results.get(key, {}).items():
            s = [x * 1000 for x in e["samples"]]
            fig[key][chain] = {
                "median": pct(s, 50),
                "p90": pct(s, 90),
                "p99": pct(s, 99),
                "n": len(s),
                "errors": e["errors"],
                "block_medians": spread([b["median"] * 1000 for b in e["blocks"] if b["median"]]),
                "cpu_ms_per_conn": spread([b["cpu_ms_per_conn"] for b in e["blocks"]])["median"],
            }
    for chain, rs in results.get("rate", {}).items():
        fig["rate"][chain] = {
            "cps": spread([r["cps"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "cpu_ms_per_conn": spread([r["cpu_ms_per_conn"] for r in rs])["median"],
        }
    for chain, e in results.get("idle", {}).items():
        window = e["window"]
        fig["idle"][chain] = {
            "streams": e["streams"],
            "requested": e["requested"],
            "alive": e["check"].get("alive"),
            "window": window,
            "roles": {
                role: {
                    "pss_kib": m["pss_per_stream"] / KIB,
                    "rss_kib": m["rss_per_stream"] / KIB,
                    "pss_total_mib": m["after"]["pss"] / (1 << 20),
                    "processes": m["after"]["processes"],
                    "cpu_s_per_min": e["cpu"][role] / window * 60,
                    "cpu_pct_core": e["cpu"][role] / window * 100,
                }
                for role, m in e["memory"].items()
            },
        }
    fig["ratios"] = ratios(fig)
    fig["goals"] = goals(fig)
    return fig


def _med(fig: dict[str, Any], *path: str) -> float:
    node: Any = fig
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return math.nan
        node = node[p]
    return float(node) if node is not None else math.nan


def ratios(fig: dict[str, Any]) -> dict[str, float]:
    r: dict[str, float] = {}
    for d in ("up", "down"):
        relay = _med(fig, "bulk", RELAY, d, "mb_s", "median")
        r[f"throughput_{d}_vs_old"] = ratio(relay, _med(fig, "bulk", OLD, d, "mb_s", "median"))
        r[f"throughput_{d}_vs_old_gcm"] = ratio(
            relay, _med(fig, "bulk", OLD_GCM, d, "mb_s", "median")
        )
        r[f"throughput_{d}_vs_direct"] = ratio(
            relay, _med(fig, "bulk", DIRECT, d, "mb_s", "median")
        )
        relay_cpu = _med(fig, "bulk", RELAY, d, "cpu_per_gib", "median")
        r[f"cpu_{d}_vs_old"] = ratio(relay_cpu, _med(fig, "bulk", OLD, d, "cpu_per_gib", "median"))
        r[f"cpu_{d}_vs_old_gcm"] = ratio(
            relay_cpu, _med(fig, "bulk", OLD_GCM, d, "cpu_per_gib", "median")
        )
    for key in ("latency", "wan"):
        relay = _med(fig, key, RELAY, "median")
        r[f"{key}_vs_old"] = ratio(relay, _med(fig, key, OLD, "median"))
        r[f"{key}_vs_direct"] = ratio(relay, _med(fig, key, DIRECT, "median"))
    r["rate_vs_old"] = ratio(
        _med(fig, "rate", RELAY, "cps", "median"), _med(fig, "rate", OLD, "cps", "median")
    )
    return r


def goals(fig: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of issue 5, each with its measured value and whether it is met."""
    r = fig["ratios"]
    out: list[dict[str, Any]] = []

    def goal(
        name: str, value: float, target: float, higher_is_better: bool, unit: str = ""
    ) -> None:
        met = (
            None
            if math.isnan(value)
            else (value >= target if higher_is_better else value <= target)
        )
        gap = (
            None
            if met is None or met
            else (target / value if higher_is_better and value else value / target)
        )
        out.append(
            {
                "goal": name,
                "target": ("≥ " if higher_is_better else "≤ ") + f"{target:g}{unit}",
                "value": value,
                "unit": unit,
                "met": met,
                "factor_missing": gap,
            }
        )

    for d in ("up", "down"):
        goal(
            f"throughput {d}: relay / old-chain (default cipher)",
            r[f"throughput_{d}_vs_old"],
            1.3,
            True,
        )
        goal(f"throughput {d}: relay / old-chain-gcm", r[f"throughput_{d}_vs_old_gcm"], 1.0, True)
        goal(
            f"CPU per GiB {d}: relay / old-chain (default cipher)", r[f"cpu_{d}_vs_old"], 0.8, False
        )
    goal("median setup latency, emulated WAN: relay / old-chain", r["wan_vs_old"], 0.65, False)
    idle = fig["idle"].get(RELAY)
    if idle:
        for role in ("relay-worker", "relay-exit"):
            if role in idle["roles"]:
                goal(
                    f"idle streams: PSS per stream at {role}",
                    idle["roles"][role]["pss_kib"],
                    16,
                    False,
                    " KiB",
                )
        hb = sum(
            idle["roles"][x]["cpu_pct_core"]
            for x in ("relay-worker", "relay-exit")
            if x in idle["roles"]
        )
        goal(
            f"idle streams: heartbeat CPU, worker + exit ({idle['streams']} streams)",
            hb,
            1.0,
            False,
            " % of a core",
        )
    checked = all(
        d["checked"] == d["runs"]
        for chain, dirs in fig["bulk"].items()
        if chain != "direct-iperf3"
        for d in dirs.values()
    )
    out.append(
        {
            "goal": "every bulk transfer checksummed (sha256) and correct",
            "target": "all",
            "value": math.nan,
            "unit": "",
            "met": checked if fig["bulk"] else None,
            "factor_missing": None,
        }
    )
    return out


# -- plots ---------------------------------------------------------------------------------------
def plots(results: dict[str, Any], fig: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    made: list[str] = []
    if fig["bulk"]:
        chains = _ordered(fig["bulk"])
        fig_, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, title in (
            (axes[0], "mb_s", "bulk throughput (MB/s, median, min-max)"),
            (axes[1], "cpu_per_gib", "chain CPU seconds per GiB"),
        ):
            width = 0.38
            for i, d in enumerate(("up", "down")):
                meds = [_med(fig, "bulk", c, d, metric, "median") for c in chains]
                lo = [m - _med(fig, "bulk", c, d, metric, "min") for c, m in zip(chains, meds)]
                hi = [_med(fig, "bulk", c, d, metric, "max") - m for c, m in zip(chains, meds)]
                xs = [x + (i - 0.5) * width for x in range(len(chains))]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=d)
            ax.set_xticks(range(len(chains)), chains, rotation=20, fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        fig_.suptitle(
            f"{results['meta']['run_id']}: {_mib(results['bulk']['size'])} per transfer", fontsize=9
        )
        fig_.tight_layout()
        fig_.savefig(out / "throughput.png", dpi=110)
        plt.close(fig_)
        made.append("throughput.png")
    if results.get("latency") or results.get("wan"):
        fig_, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, title in (
            (axes[0], "latency", "setup latency on loopback"),
            (
                axes[1],
                "wan",
                "emulated WAN (each way: login-exit 5 ms, exit-dest 10 ms)",
            ),
        ):
            if not results.get(key):
                ax.set_title(f"{title}: not measured in this run", fontsize=9)
                ax.set_axis_off()
                continue
            for chain in _ordered(results.get(key, {})):
                s = sorted(x * 1000 for x in results[key][chain]["samples"])
                if s:
                    ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=chain)
            ax.set_xscale("log")
            subs = (1.0, 3.0) if key == "latency" else (1.0, 2.0, 3.0, 5.0)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("connect + 1-byte echo (ms, log scale)")
            ax.set_ylabel("fraction of connections")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig_.tight_layout()
        fig_.savefig(out / "latency_cdf.png", dpi=110)
        plt.close(fig_)
        made.append("latency_cdf.png")
    if fig["idle"]:
        fig_, ax = plt.subplots(figsize=(9, 4))
        labels, vals = [], []
        for chain in _ordered(fig["idle"]):
            e = fig["idle"][chain]
            for role, m in e["roles"].items():
                labels.append(f"{chain}\n{role}\n({e['streams']} streams)")
                vals.append(m["pss_kib"])
        bars = ax.bar(range(len(vals)), vals, color="tab:purple")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(vals)), labels, fontsize=7)
        ax.axhline(
            16, color="tab:red", linestyle="--", linewidth=1, label="goal: 16 KiB (worker, exit)"
        )
        ax.set_ylabel("PSS per idle stream (KiB)")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title("memory per idle stream, by process (tree)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig_.tight_layout()
        fig_.savefig(out / "idle_memory.png", dpi=110)
        plt.close(fig_)
        made.append("idle_memory.png")
    return made


def _mib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


# -- markdown ----------------------------------------------------------------------------------
def settings_of(results: dict[str, Any]) -> list[str]:
    """The settings a run measured, in the order run (runs before the lab: loopback only)."""
    meta = results["meta"]
    return list(meta.get("settings") or ["loopback"])


def markdown(
    results: dict[str, Any], fig: dict[str, Any], images: list[str], image_prefix: str = ""
) -> str:
    m = results["meta"]
    settings = settings_of(results)
    L: list[str] = []
    L.append(f"### Run `{m['run_id']}`\n")
    L.append(
        f"Command: `{m['command']}` (as root, from the repository root; `make bench` = "
        "`--full --update-docs`, `make bench-quick` = `--quick`). "
        f"Started {m['started']}, finished {m.get('finished', '?')}; load average "
        f"{' '.join(m['loadavg_start'])} at start, {' '.join(m.get('loadavg_end', ['?']))} at end "
        "(a shared machine: other work may have run meanwhile).\n"
    )
    if m.get("failure"):
        L.append(f"**RUN FAILED: {m['failure']}**\n")
    measured = (
        "Settings, in the order run: " + "; ".join(SETTING_TITLES.get(s, s) for s in settings)
        if "lab" in settings
        else "Setting: loopback only (no namespace lab in this run)"
    )
    L.append(
        f"{measured}. Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), kernel "
        f"{m.get('kernel')}, Python {m.get('python')}; every figure below names its setting. "
        "Ratios compare chains measured in the same setting of this one run.\n"
    )
    L.append("| machine | |\n|---|---|")
    for key in (
        "nproc",
        "cpu",
        "memory_gib",
        "kernel",
        "os",
        "python",
        "openssh",
        "dante",
        "proxychains4",
        "iperf3",
        "asyncssh",
        "uvloop",
        "cryptography",
        "pproxy",
        "relay",
        "variants",
        "rlimit_nofile",
    ):
        L.append(f"| {key} | {m.get(key)} |")
    L.append("")
    if "lab" in settings or results.get("lab"):
        L.extend(lab_section(results, image_prefix))
    if "loopback" in settings:
        L.extend(loopback_section(results, fig, images, image_prefix))
    return "\n".join(L)


SETTING_TITLES = {
    "lab": "namespace lab (primary)",
    "loopback": "loopback (second)",
}


def lab_section(results: dict[str, Any], image_prefix: str = "") -> list[str]:
    """The primary table: the namespace lab's medians, ratios and how they were made."""
    from bench import lab_chains

    L = ["#### Namespace lab (primary setting)\n"]
    lab = results.get("lab")
    if not lab:
        L.append("Not measured in this run.\n")
        return L
    lm, agg = lab["meta"], lab["medians"]
    L.append(
        f"Reproduce: `{lm['command']}` (as root, from the repository root). Compute node, "
        "login node, firewall and outside in network namespaces joined by veth links: the "
        "client runs in the worker namespace, each chain has its own sshd in the login "
        "namespace, an nftables forwarding firewall passes only new login -> outside TCP to "
        "ports 80/443, exits, dantes and the sink run in the outside namespace. "
        f"{lm['cpus']} CPUs, kernel {lm['kernel']}, Python {lm['python']}, {lm['openssh']}, "
        f"{lm['dante']}, relay {lm['commit']}; load average {lm['load_before']} before, "
        f"{lm.get('load_after', '-')} after; {lm.get('seconds', '?')} s.\n"
    )
    L.append(lab_chains.method_note(lm) + "\n")
    if lm.get("failure"):
        L.append(f"**LAB FAILED: {lm['failure']}**\n")
    names = [n for n in lm["chains"] if n in agg]
    L.extend(lab_chains.primary_table(agg, names))
    ratios = lab_chains.ratio_table(agg, names)
    if ratios:
        L.append("\n" + lab_chains.RATIO_NOTE + "\n")
        L.extend(ratios)
    L.append("\nChains:\n")
    L.extend(lab_chains.chain_lines(lm, names))
    L.append(
        f"\nThe busiest process of each transfer: [lab/summary.md]({image_prefix}lab/summary.md);"
        " configurations and every sample: results.json of the run.\n"
    )
    return L


def loopback_section(
    results: dict[str, Any], fig: dict[str, Any], images: list[str], image_prefix: str = ""
) -> list[str]:
    """The second table: every chain on 127.0.0.1 (bench.chains)."""
    m = results["meta"]
    L = ["#### Loopback (second setting)\n"]
    reproduce = m.get("setting_commands", {}).get("loopback")
    how = (
        f"Reproduce: `{reproduce}` (as root, from the repository root)."
        if reproduce
        else f"Measured by `{m['command']}`, from before the namespace lab was part of "
        "`python -m bench`; today `--settings loopback` added to it measures this setting alone."
    )
    L.append(
        f"{how} Every chain on "
        "127.0.0.1: no NIC, no firewall, one kernel's TCP stack at both ends, which flatters a "
        "Python relay against OpenSSH and dante. Figures are medians over interleaved runs "
        "(every chain once per repetition, A B C A B C ...).\n"
    )
    L.append(
        "Chains (each with its own sshd and exit, all on 127.0.0.1, all set up and measured in "
        "this one run, interleaved A B C A B C ...):\n"
    )
    for name, c in results.get("chains", {}).items():
        L.append(f"- `{name}`: {c['description']}")
    if fig["bulk"]:
        L.append("- `direct-iperf3`: iperf3 client -> iperf3 server (no checksum; the ceiling)")
    L.append("")

    if fig["bulk"]:
        size = results["bulk"]["size"]
        L.append(
            f"##### Bulk throughput ({_mib(size)} per transfer, sha256 checked, "
            f"{m['params']['bulk_reps']} runs per chain and direction)\n"
        )
        L.append(
            "MB/s = 10^6 bytes/s, median [min - max]. CPU = chain CPU seconds per GiB: "
            "utime+stime of every process of the chain (ssh, sshd and its per-connection "
            "children, danted and its children, relay-worker, relay-exit, pproxy), not "
            "counting the client and the sink.\n"
        )
        L.append("| chain | up MB/s | down MB/s | CPU s/GiB up | CPU s/GiB down | checksums ok |")
        L.append("|---|---|---|---|---|---|")
        for chain in _ordered(fig["bulk"]):
            e = fig["bulk"][chain]
            cells = []
            for d in ("up", "down"):
                s = e[d]["mb_s"]
                cells.append(f"{f(s['median'])} [{f(s['min'])} - {f(s['max'])}]")
            for d in ("up", "down"):
                s = e[d]["cpu_per_gib"]
                cells.append(
                    "-"
                    if chain == "direct-iperf3"
                    else f"{f(s['median'], 2)} [{f(s['min'], 2)} - {f(s['max'], 2)}]"
                )
            checked = e["up"]["checked"] + e["down"]["checked"]
            ok = (
                "n/a"
                if chain == "direct-iperf3"
                else f"{checked}/{e['up']['runs'] + e['down']['runs']}"
            )
            L.append(f"| {chain} | " + " | ".join(cells) + f" | {ok} |")
        L.append("")
        L.append("CPU seconds per GiB by process (median):\n")
        L.append("| chain | direction | " + "by process |\n|---|---|---|")
        for chain in _ordered(fig["bulk"]):
            for d in ("up", "down"):
                roles = fig["bulk"][chain][d]["cpu_roles"]
                if roles:
                    L.append(
                        f"| {chain} | {d} | "
                        + ", ".join(f"{r} {v:.2f}" for r, v in roles.items())
                        + " |"
                    )
        L.append("")
    for key, title in (
        ("latency", "Connection setup latency on loopback"),
        ("wan", "Connection setup latency under the emulated WAN"),
    ):
        if not fig[key]:
            continue
        L.append(f"##### {title}\n")
        if key == "wan":
            L.append(
                "A user-space forwarder (`bench/delay.py`) holds every chunk 5 ms each way on "
                "the login -> exit leg and 10 ms each way on the exit -> destination leg, for "
                "every chain alike (this kernel has no `sch_netem`). Accept and connect are "
                "not delayed, only data. `direct` crosses only the destination leg. Floor for "
                "connect + 1-byte echo through a relay: 30 ms.\n"
            )
        L.append(
            "Open a connection through the chain (proxychains4 does the SOCKS handshakes in "
            "connect(), as for the glidein), send 1 byte, read its echo. Milliseconds; "
            "median, p90 and p99 over all connections; spread = min - max of the "
            "per-block medians; CPU = chain CPU ms per connection.\n"
        )
        L.append("| chain | n | median | p90 | p99 | block medians | errors | CPU ms/conn |")
        L.append("|---|---|---|---|---|---|---|---|")
        for chain in _ordered(fig[key]):
            e = fig[key][chain]
            b = e["block_medians"]
            L.append(
                f"| {chain} | {e['n']} | {f(e['median'], 3)} | {f(e['p90'], 3)} | "
                f"{f(e['p99'], 3)} | {f(b['min'], 3)} - {f(b['max'], 3)} | {e['errors']} | "
                f"{f(e['cpu_ms_per_conn'], 2)} |"
            )
        L.append("")
    if fig["rate"]:
        p = m["params"]
        L.append(
            f"##### New-connection rate\n\n{p['rate_procs']} client processes, each opening "
            "a connection, echoing 1 byte and closing, back to back, for "
            f"{p['rate_seconds']:g} s; {p['rate_rounds']} round(s).\n"
        )
        L.append(
            "| chain | connections/s median [min - max] | errors | CPU ms/conn |\n|---|---|---|---|"
        )
        for chain in _ordered(fig["rate"]):
            e = fig["rate"][chain]
            s = e["cps"]
            L.append(
                f"| {chain} | {f(s['median'])} [{f(s['min'])} - {f(s['max'])}] | "
                f"{e['errors']} | {f(e['cpu_ms_per_conn'], 2)} |"
            )
        L.append("")
    if fig["idle"]:
        hb = m["params"].get("relay_worker_config", {}).get("heartbeat", "25 (default)")
        L.append("##### Concurrent idle streams\n")
        L.append(
            "Streams opened through one chain by an asyncio SOCKS5 client (the same bytes "
            "proxychains sends; every stream proven by a 1-byte echo), then left idle. Memory "
            "per stream = (PSS or RSS of the process tree with the streams - before) / "
            f"streams. CPU over an idle window with the relay's heartbeat at {hb} s; `alive` = "
            "streams that still echo after the window. The soft RLIMIT_NOFILE is raised to the "
            f"hard limit ({m['rlimit_nofile'][1]} here); relay-exit holds two descriptors per "
            "stream (carrier and destination), which caps one exit process at about half of it.\n"
        )
        L.append(
            "| chain | streams | process | PSS KiB/stream | RSS KiB/stream "
            "| PSS total MiB (processes) | CPU s/min | % of a core |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for chain in _ordered(fig["idle"]):
            e = fig["idle"][chain]
            for role, r in e["roles"].items():
                L.append(
                    f"| {chain} | {e['streams']}/{e['requested']} (alive {e['alive']}) | {role} | "
                    f"{f(r['pss_kib'], 1)} | {f(r['rss_kib'], 1)} | {f(r['pss_total_mib'], 1)} "
                    f"({r['processes']}) | {f(r['cpu_s_per_min'], 3)} | {f(r['cpu_pct_core'], 3)} |"
                )
            L.append(
                f"| {chain} | | **all** | "
                f"{f(sum(r['pss_kib'] for r in e['roles'].values()), 1)} | "
                f"{f(sum(r['rss_kib'] for r in e['roles'].values()), 1)} | | "
                f"{f(sum(r['cpu_s_per_min'] for r in e['roles'].values()), 3)} | "
                f"{f(sum(r['cpu_pct_core'] for r in e['roles'].values()), 3)} |"
            )
        L.append(f"\nIdle window: {m['params']['idle_window']:g} s.\n")
    r = fig["ratios"]
    if any(not math.isnan(v) for v in r.values()):
        L.append("##### Ratios (same run, loopback)\n")
        L.append("| ratio | value |\n|---|---|")
        for k, v in r.items():
            if not math.isnan(v):
                L.append(f"| {k.replace('_', ' ')} | {v:.2f} |")
        L.append("")
    if fig["goals"]:
        L.append("##### Goals of issue 5\n")
        L.append("| goal | target | measured | met |\n|---|---|---|---|")
        for g in fig["goals"]:
            value = "-" if math.isnan(g["value"]) else f"{g['value']:.2f}{g['unit']}"
            met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
            if g["factor_missing"]:
                met += f" (off by x{g['factor_missing']:.2f})"
            L.append(f"| {g['goal']} | {g['target']} | {value} | {met} |")
        L.append("")
    for img in images:
        L.append(f"![{img}]({image_prefix}{img})\n")
    if results.get("skipped"):
        L.append(f"Skipped (time budget): {', '.join(results['skipped'])}\n")
    return L


def write(results: dict[str, Any], out: Path) -> Path:
    fig = figures(results)
    images = plots(results, fig, out)
    (out / "figures.json").write_text(json.dumps(fig, indent=1, default=str))
    path = out / "summary.md"
    path.write_text(markdown(results, fig, images))
    return path


def update_docs(out: Path, doc: Path = DOC) -> None:
    results = json.loads((out / "results.json").read_text())
    fig = figures(results)
    images = [p.name for p in sorted(out.glob("*.png"))]
    prefix = str(out.resolve().relative_to(REPO)) + "/"
    block = markdown(results, fig, images, image_prefix="../" + prefix)
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    note = (
        "<!-- generated by `python -m bench.report --update-docs` from "
        f"{prefix}results.json; do not edit by hand -->"
    )
    doc.write_text(f"{head}{BEGIN}\n{note}\n\n{block}\n{END}{tail}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("run", type=Path)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads((args.run / "results.json").read_text())
    print(write(results, args.run))
    if args.update_docs:
        update_docs(args.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
