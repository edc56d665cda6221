"""glidein-wrapper: run an unmodified glidein (or any command) behind the relay.

One command in the batch job starts the relay worker in the same process (or attaches to a
running one), waits until the chain is ready, points the command at the relay through the
proxychains-ng LD_PRELOAD interposer and the usual proxy variables, tells HTCondor the drone's
TardisDroneUuid and to talk TCP only, forwards signals, and exits with the command's status.

Modules, one job each: :mod:`.options` (command line), :mod:`.rundir` (private per-run files
and credentials), :mod:`.ready` (readiness gate), :mod:`.proxychains` (interposer config and
environment), :mod:`.condor` (HTCondor settings), :mod:`.supervisor` (the command's process
group, signals, exit status, status lines) and :mod:`.main` (putting them together).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the chain was not ready in time, nothing was started
