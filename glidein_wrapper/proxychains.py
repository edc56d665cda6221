"""Making an unmodified COMMAND use the relay: proxychains-ng config and environment.

proxychains-ng's ``libproxychains4.so`` is an LD_PRELOAD interposer: it catches ``connect()``
(and, with ``proxy_dns``, name lookups) in every dynamically linked program and sends the
connection through the listed SOCKS5 proxy, here the relay worker's local listener. It cannot
reach statically linked or Go programs; for those (and for HTTP-proxy-only tools) the
``ALL_PROXY``/``https_proxy`` variables, the worker's HTTP CONNECT listener and its static
forwards remain.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union
from urllib.parse import quote

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Where distributions put the library (Debian/Ubuntu multiarch, Fedora/EPEL, source builds).
PRELOAD_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libproxychains.so.4",
    "/usr/lib/aarch64-linux-gnu/libproxychains.so.4",
    "/usr/lib/powerpc64le-linux-gnu/libproxychains.so.4",
    "/usr/lib/*-linux-gnu/libproxychains.so.4",
    "/usr/lib64/proxychains-ng/libproxychains4.so",
    "/usr/lib/proxychains-ng/libproxychains4.so",
    "/usr/lib64/libproxychains4.so",
    "/usr/lib/libproxychains4.so",
    "/usr/local/lib/libproxychains4.so",
    "/usr/local/lib64/libproxychains4.so",
)

#: Loopback never goes through the relay: the relay itself listens there.
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class PreloadMissing(Exception):
    """The interposer library was not found; the message says where it was looked for."""


def find_preload(explicit: Optional[Path] = None, must_exist: bool = True) -> str:
    """Path of libproxychains4: ``explicit`` if given, else the first usual place that has it.

    With ``must_exist`` False an explicit path is taken as is (it may exist only inside the
    container COMMAND starts).
    """
    if explicit is not None:
        if must_exist and not explicit.is_file():
            raise PreloadMissing(f"--preload {explicit}: no such file")
        return str(explicit)
    candidates = list(PRELOAD_CANDIDATES)
    binary = shutil.which("proxychains4")
    if binary is not None:  # a source build in a prefix: PREFIX/bin/proxychains4
        prefix = Path(binary).resolve().parent.parent
        candidates += [str(prefix / lib / "libproxychains4.so") for lib in ("lib", "lib64")]
    for pattern in candidates:
        for path in sorted(glob.glob(pattern)):
            if os.path.isfile(path):
                return path
    raise PreloadMissing(
        "cannot find the proxychains-ng library (libproxychains4.so / libproxychains.so.4);"
        " install proxychains-ng (Debian: libproxychains4, EL: proxychains-ng) or give"
        " --preload PATH; looked in " + ", ".join(candidates)
    )


def _localnet(net: Network) -> str:
    if isinstance(net, ipaddress.IPv4Network):
        return f"localnet {net.network_address}/{net.netmask}"
    return f"localnet {net.network_address}/{net.prefixlen}"


def render_config(
    socks_host: str,
    socks_port: int,
    user: str,
    password: str,
    direct: Sequence[Network] = (),
    remote_dns: bool = True,
    handshake_timeout: float = 20.0,
) -> str:
    """A proxychains-ng config with one hop: the relay's local SOCKS5 listener.

    ``strict_chain`` with a single proxy: every connection goes through it or fails, never
    silently around it. ``localnet`` lines exempt loopback and the ``--direct`` networks.
    """
    for word in (user, password):
        if not word or any(c.isspace() for c in word):
            raise ValueError("proxychains cannot express a user or password with blanks")
    lines = [
        "# proxychains-ng configuration written by glidein-wrapper for one run (mode 0600)",
        "strict_chain",
        "quiet_mode",
    ]
    if remote_dns:
        lines += ["proxy_dns", "remote_dns_subnet 224"]
    read_ms = int(max(handshake_timeout, 1.0) * 1000)
    lines += [
        f"tcp_read_time_out {read_ms}",
        "tcp_connect_time_out 5000",
        _localnet(LOOPBACK),
    ]
    lines += [_localnet(net) for net in direct]
    lines += ["", "[ProxyList]", f"socks5 {socks_host} {socks_port} {user} {password}", ""]
    return "\n".join(lines)


def proxy_env(
    *,
    preload: str,
    config: Path,
    socks: tuple[str, int],
    user: str,
    password: str,
    http: Optional[tuple[str, int]],
    direct: Sequence[Network] = (),
    proxy_variables: bool = True,
    inherited: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """The variables COMMAND gets: the interposer, and the proxy variables of proxy-aware tools.

    ``http_proxy`` is deliberately not set: the HTTP listener only tunnels (CONNECT), and a
    plain ``http://`` request sent to it would be refused; such requests are carried by the
    interposer or ``ALL_PROXY`` instead.
    """
    previous = inherited.get("LD_PRELOAD", "")
    env = {
        "LD_PRELOAD": f"{preload}:{previous}" if previous else preload,
        "PROXYCHAINS_CONF_FILE": str(config),
        "PROXYCHAINS_QUIET_MODE": "1",
    }
    if not proxy_variables:
        return env
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    socks_url = f"socks5h://{auth}{_host(socks[0])}:{socks[1]}"
    env["ALL_PROXY"] = env["all_proxy"] = socks_url
    if http is not None:
        env["https_proxy"] = env["HTTPS_PROXY"] = f"http://{auth}{_host(http[0])}:{http[1]}"
    no_proxy = ["localhost", "127.0.0.1", "127.0.0.0/8", "::1"] + [str(net) for net in direct]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    return env


def container_env(
    env: Mapping[str, str], prefixes: Iterable[str] = ("SINGULARITYENV_", "APPTAINERENV_")
) -> dict[str, str]:
    """Copies of ``env`` that Singularity/Apptainer put into a container's environment."""
    return {prefix + name: value for prefix in prefixes for name, value in env.items()}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
