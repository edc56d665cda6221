"""`make site-demo`: watch COBalD/TARDIS run glidein jobs under Slurm behind the relay.

Builds the batch site of tests/support/batchsite.py (as root: namespaces, Slurm, sshd, the exit),
has TARDIS start --drones glideins through deploy/jureca/glidein.sbatch, shows Slurm's queue
and TARDIS's drones every few seconds while the glideins sit idle behind the firewall, then
takes the demand away so TARDIS drains them, and tears everything down.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.support.batchsite import BatchSite


def _show(batch: BatchSite, tardis: object, started: float) -> None:
    assert batch.slurm is not None
    queue = batch.slurm.command(["squeue", "-h", "-o", "%i %T %N %M %j"], check=False).stdout
    drones = tardis.drones()  # type: ignore[attr-defined]
    print(f"--- {time.monotonic() - started:5.0f} s")
    for line in queue.splitlines() or ["(no jobs)"]:
        print(f"  slurm  {line}")
    for drone in drones:
        report = batch.report(int(drone.job_id)) if drone.job_id else None
        chain = "glidein connected" if report and "first" in report else ""
        print(f"  tardis {drone.uuid} {drone.state} job={drone.job_id} {chain}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="compute nodes (default 2)")
    parser.add_argument("--drones", type=int, default=2, help="glideins TARDIS keeps (2)")
    parser.add_argument("--run", type=float, default=30, help="seconds all run idle (30)")
    args = parser.parse_args()
    started = time.monotonic()
    print("building the site: namespaces, sshd, Slurm, the exit; installing the relay ...")
    with BatchSite.create(nodes=max(args.nodes, args.drones)) as batch:
        print(f"  relay installed in {batch.home} by install-relay.sh as {batch.user}")
        script = batch.write_sbatch("glidein.sbatch", idle=3600)
        print("starting COBalD/TARDIS (the first run installs it into a venv) ...")
        with batch.tardis(script, drones=args.drones) as tardis:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                _show(batch, tardis, started)
                drones = tardis.drones()
                up = [d for d in drones if d.job_id and (batch.report(int(d.job_id)) or {})]
                if len(up) >= args.drones:
                    break
                time.sleep(3)
            until = time.monotonic() + args.run
            while time.monotonic() < until:
                time.sleep(5)
                _show(batch, tardis, started)
            print("demand 0: TARDIS drains the drones (scancel -> SIGTERM -> stage-out) ...")
            tardis.set_drones(0)
            deadline = time.monotonic() + 180
            while tardis.drones() and time.monotonic() < deadline:
                time.sleep(3)
                _show(batch, tardis, started)
            history = tardis.history()
        for uuid, states in history.items():
            print(f"  {uuid}: {' -> '.join(s.replace('State', '') for s in states)}")
        for path in sorted((batch.home / "logs").glob("glidein-*.log")):
            print(f"=== {path.name} (last lines)")
            for line in path.read_text(errors="replace").splitlines()[-4:]:
                print(f"  {line}")
    print(f"done in {time.monotonic() - started:.0f} s; site torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
