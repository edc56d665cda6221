"""A stand-in glidein for the glidein-wrapper tests: a plain, proxy-unaware program.

It uses bare ``socket.create_connection`` (and runs ``curl`` without proxy flags), so it can
only reach a destination outside the worker namespace if the LD_PRELOAD interposer the wrapper
set up carries it through the relay. Standalone (stdlib only), run as
``glidein-wrapper ... -- python standin.py --report FILE [ACTIONS]``. Every action's result
goes into one JSON report, written when the stand-in ends (also after a signal).

Actions, in this order:
  --echo HOST:PORT [--idle S]   line echo, idle S seconds, line echo again on the same socket
  --direct HOST:PORT            line echo (a destination the wrapper was told to reach directly)
  --forward HOST:PORT           line echo to a static forward of the relay worker
  --curl URL                    curl as is (sees ALL_PROXY / https_proxy from the environment)
  --curl-interposer URL         curl with every proxy variable removed (only the interposer left)
  --curl-proxy URL              curl through $https_proxy (the worker's HTTP CONNECT listener)
  --curl-bad-proxy URL          the same with a wrong proxy password (expects 407)
  --wait-signal                 write {"waiting": true} to FILE.ready, then wait for SIGTERM or
                                SIGUSR1; on SIGTERM clean up and exit 0; SIGUSR1 keeps its
                                default action (the stand-in dies of it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ENV_NAMES = (
    "LD_PRELOAD",
    "PROXYCHAINS_CONF_FILE",
    "PROXYCHAINS_QUIET_MODE",
    "ALL_PROXY",
    "all_proxy",
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "TardisDroneUuid",
    "GLIDEIN_WRAPPER_CONDOR_CONFIG",
)
PROXY_VARIABLES = ("ALL_PROXY", "all_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "NO_PROXY")

report: dict[str, Any] = {"pid": os.getpid()}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def echo(target: str, idle: float = 0.0) -> dict[str, Any]:
    result: dict[str, Any] = {"first": False, "after_idle": None, "error": None}
    try:
        with socket.create_connection(_hostport(target), timeout=20) as sock:
            reader = sock.makefile("rb")
            sock.sendall(b"first\n")
            result["first"] = reader.readline() == b"first\n"
            if idle:
                time.sleep(idle)
                sock.sendall(b"after idle\n")
                result["after_idle"] = reader.readline() == b"after idle\n"
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def curl(url: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = ["curl", "-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code} %{http_connect}"]
    res = subprocess.run([*argv, *args, url], capture_output=True, env=env, timeout=60, check=False)
    body, _, codes = res.stdout.rpartition(b"\n")
    http_code, _, connect_code = codes.decode().partition(" ")
    return {
        "rc": res.returncode,
        "http_code": http_code,
        "connect_code": connect_code,
        "sha256": hashlib.sha256(body).hexdigest(),
        "stderr": res.stderr.decode(errors="replace")[-500:],
    }


def _bad_password(proxy_url: str) -> str:
    parts = urlsplit(proxy_url)
    netloc = f"glidein:wrong-password@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def write_report(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--echo")
    parser.add_argument("--idle", type=float, default=0.0)
    parser.add_argument("--direct")
    parser.add_argument("--forward")
    parser.add_argument("--curl")
    parser.add_argument("--curl-interposer")
    parser.add_argument("--curl-proxy")
    parser.add_argument("--curl-bad-proxy")
    parser.add_argument("--wait-signal", action="store_true")
    args = parser.parse_args()

    report["env"] = {name: os.environ.get(name) for name in ENV_NAMES}
    report["condor_env"] = {k: v for k, v in os.environ.items() if k.startswith("_CONDOR_")}
    report["container_env"] = sorted(
        k for k in os.environ if k.startswith(("SINGULARITYENV_", "APPTAINERENV_"))
    )
    for key, variable in (("condor_config", "GLIDEIN_WRAPPER_CONDOR_CONFIG"),
                          ("proxychains_conf", "PROXYCHAINS_CONF_FILE")):  # fmt: skip
        path = os.environ.get(variable)
        if path:
            info = os.stat(path)
            report[key] = {"text": Path(path).read_text(), "mode": oct(info.st_mode & 0o777)}
    if args.echo:
        report["echo"] = echo(args.echo, args.idle)
    if args.direct:
        report["direct"] = echo(args.direct)
    if args.forward:
        report["forward"] = echo(args.forward)
    if args.curl:
        report["curl"] = curl(args.curl)
    if args.curl_interposer:
        bare = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
        bare = {k: v for k, v in bare.items() if k.lower() not in ("all_proxy", "https_proxy")}
        report["curl_interposer"] = curl(args.curl_interposer, env=bare)
    proxy = os.environ.get("https_proxy", "")
    if args.curl_proxy:
        report["curl_proxy"] = curl(args.curl_proxy, "--proxytunnel", "--proxy", proxy)
    if args.curl_bad_proxy:
        bad = _bad_password(proxy)
        report["curl_bad_proxy"] = curl(args.curl_bad_proxy, "--proxytunnel", "--proxy", bad)
    if args.wait_signal:
        return wait_for_signal(args.report)
    write_report(args.report)
    return 0


def wait_for_signal(path: Path) -> int:
    got: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        got.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    ready = path.with_name(path.name + ".ready")
    ready.write_text(json.dumps({"waiting": True, "pid": os.getpid()}))
    deadline = time.monotonic() + 120
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    # "cleanup": what a glidein does on SIGTERM before it exits
    report["signal"] = got[0] if got else None
    report["cleaned_up"] = True
    write_report(path)
    return 0 if got else 3


if __name__ == "__main__":
    sys.exit(main())
