"""HTCondor settings for a glidein behind the relay: the drone's uuid and TCP-only traffic.

How they reach HTCondor (see docs/WRAPPER.md for the reasoning): as ``_CONDOR_<NAME>``
environment variables. HTCondor reads them after every configuration file, each one defining
exactly one macro, so they add what the relay needs without replacing the glidein's own
configuration file or its ``LOCAL_CONFIG_DIR``/``LOCAL_CONFIG_FILE`` lists (which an environment
variable could not extend anyway: the environment is read after the files are chosen).

* ``TardisDroneUuid = "<uuid>"`` defines the attribute, and ``STARTD_EXPRS = TardisDroneUuid``
  puts it in the startd ClassAd. ``<SUBSYS>_EXPRS`` is merged into the ``<SUBSYS>_ATTRS`` list
  by HTCondor, so the glidein's ``STARTD_ATTRS`` stays as it is; setting ``_CONDOR_STARTD_ATTRS``
  instead would replace it.
* ``UPDATE_COLLECTOR_WITH_TCP``/``UPDATE_VIEW_COLLECTOR_WITH_TCP = True`` and
  ``WANT_UDP_COMMAND_SOCKET = False``: the relay carries TCP only.

The same settings are also written as a config file (``condor_config.relay``) that a drone's
own configuration may ``include``; its path is in ``GLIDEIN_WRAPPER_CONDOR_CONFIG``.
"""

from __future__ import annotations

from typing import Optional

PREFIX = "_CONDOR_"
SNIPPET_NAME = "condor_config.relay"
SNIPPET_VARIABLE = "GLIDEIN_WRAPPER_CONDOR_CONFIG"

TCP_ONLY = (
    ("UPDATE_COLLECTOR_WITH_TCP", "True"),
    ("UPDATE_VIEW_COLLECTOR_WITH_TCP", "True"),
    ("WANT_UDP_COMMAND_SOCKET", "False"),
)


def settings(drone_uuid: Optional[str]) -> list[tuple[str, str]]:
    """The macros, in the order a config file would set them."""
    out: list[tuple[str, str]] = []
    if drone_uuid:
        out.append(("TardisDroneUuid", f'"{drone_uuid}"'))
        out.append(("STARTD_EXPRS", "TardisDroneUuid"))
    out.extend(TCP_ONLY)
    return out


def condor_env(drone_uuid: Optional[str]) -> dict[str, str]:
    """``_CONDOR_*`` variables for COMMAND (and TardisDroneUuid itself, as TARDIS sets it)."""
    env = {PREFIX + name: value for name, value in settings(drone_uuid)}
    if drone_uuid:
        env["TardisDroneUuid"] = drone_uuid
    return env


def render_snippet(drone_uuid: Optional[str]) -> str:
    """The same settings as an HTCondor config file, for configs that include it.

    In a file HTCondor expands a macro's reference to itself at once, so appending to
    ``STARTD_ATTRS`` is safe there, whether or not it was set before.
    """
    lines = [
        "# HTCondor settings for a glidein behind hpc-relay, written by glidein-wrapper.",
        "# The relay carries TCP only; it keeps idle connections alive itself, so",
        "# CCB_HEARTBEAT_INTERVAL and TCP_KEEPALIVE_INTERVAL need no change.",
    ]
    for name, value in settings(drone_uuid):
        if name == "STARTD_EXPRS":
            lines.append("STARTD_ATTRS = $(STARTD_ATTRS) TardisDroneUuid")
        else:
            lines.append(f"{name} = {value}")
    return "\n".join(lines) + "\n"
