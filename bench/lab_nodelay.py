"""What sshd's Nagle algorithm costs the relay: the lab's connection rate with sshd's sockets
as sshd sets them, with TCP_NODELAY on all of them, and with the node's ssh acknowledging at once.

    python -m bench.lab_nodelay [--rounds 3] [--seconds 5] [--parallel 8]   # as root

sshd sets TCP_NODELAY only for a session with a pty or X11 forwarding; a carrier's ``ssh -N``
has neither, so sshd's small packets (a REPLY, an ACK) wait for the acknowledgement of what
it sent before. No option of ssh or sshd changes that, so this experiment reaches into the
login node's sshd from outside: it takes duplicates of the TCP sockets of the chain's sshd
processes (``pidfd_getfd``, Linux 5.6 and root) and sets TCP_NODELAY on them between
measurements: as sshd set it, then on for all of them, then as set but with TCP_QUICKACK re-armed
every half millisecond on the worker's ssh's socket (so sshd's packets are acknowledged at once
and Nagle releases the next); rotating round by round on the same chain and the same SSH
connection; every stream echoes a byte. Prints one JSON line per
measurement and the medians. An experiment for the record, not a way to run a site.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
from typing import Optional

from bench import procstat
from bench.lab_chains import bench_as_root
from relay.net.childsocket import tcp_sockets


def _name(sock: socket.socket) -> str:
    try:
        return f"{sock.getsockname()[0]}:{sock.getsockname()[1]} -> {sock.getpeername()[0]}"
    except OSError:
        return f"{sock.getsockname()[0]}:{sock.getsockname()[1]} (listening)"


def nodelay_state(pids: list[int]) -> dict[str, bool]:
    """Every TCP socket of ``pids`` (by address) and whether it has TCP_NODELAY."""
    state: dict[str, bool] = {}
    for pid in pids:
        for sock in tcp_sockets(pid):
            with sock:
                state[f"{pid} {_name(sock)}"] = bool(
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                )
    return state


def set_nodelay(pids: list[int], want: dict[str, bool]) -> None:
    """Set TCP_NODELAY on each TCP socket of ``pids`` named in ``want`` as it says."""
    for pid in pids:
        for sock in tcp_sockets(pid):
            with sock:
                key = f"{pid} {_name(sock)}"
                if key in want:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(want[key]))


class QuickAck:
    """Re-arms TCP_QUICKACK on ``sockets`` every half millisecond while ``active``: from
    outside, about what the worker does on its ssh's socket after every small read of a
    carrier (relay.net.childsocket); against a worker that does it already, this case
    measures what re-arming more often would add."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.active = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            if self.active:
                for sock in self.sockets:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.sockets:
            sock.close()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lab_nodelay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--chain", default="relay-openssh")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--parallel", type=int, default=8, help="concurrent client loops")
    args = parser.parse_args(argv)
    bench = bench_as_root("lab-nodelay-")
    modes = ("as set", "sshd nodelay", "ssh quickack")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    try:
        bench.start([args.chain])
        chain = bench.chains[args.chain]
        bench.latency(chain, 3)  # carriers and the SSH connection are up
        pids = procstat.tree([chain.roles["sshd"][0]])
        default = nodelay_state(pids)
        print(json.dumps({"sshd_sockets_nodelay": default}), flush=True)
        rearm = QuickAck([s for pid in chain.pids().get("ssh", []) for s in tcp_sockets(pid)])
        try:
            for _ in range(args.rounds):
                for mode in modes:
                    everywhere = dict.fromkeys(default, True)
                    set_nodelay(pids, everywhere if mode == "sshd nodelay" else default)
                    rearm.active = mode == "ssh quickack"
                    res = bench.rate(chain, args.seconds, args.parallel)
                    rates[mode].append(res["per_second"])
                    print(json.dumps({"mode": mode, "per_second": round(res["per_second"])}))
        finally:
            rearm.stop()
    finally:
        bench.close()
    medians = {mode: round(statistics.median(v)) for mode, v in rates.items()}
    print(json.dumps({"chain": args.chain, "median_per_second": medians}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
