"""Where a stream may go: names resolved once and checked against the policy, and why a
dial failed, as a SOCKS5 reply code."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Optional

from relay.exit.policy import Policy
from relay.metrics import Metrics
from relay.proto import socks5 as s5
from relay.proto.errors import RelayError


async def resolve(
    policy: Policy, metrics: Metrics, timeout: float, host: str, port: int, atyp: int
) -> list[str]:
    """Resolve once (within ``timeout`` seconds), keep only addresses the policy allows;
    these are what gets dialled."""
    if atyp != s5.ATYP_DOMAIN:
        decision = policy.check(host, port)
        if not decision.allowed:
            raise _denied(metrics, decision.reason)
        return [host]
    if not policy.may_allow_name(host, port):
        raise _denied(metrics, "no_rule")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
            timeout,
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise Refusal(s5.HOST_UNREACHABLE, "unresolved", f"cannot resolve: {exc}") from None
    allowed: list[str] = []
    first_reason = ""
    for info in infos:
        address = str(info[4][0])
        decision = policy.check(address, port, host)
        if decision.allowed:
            if address not in allowed:
                allowed.append(address)
        elif not first_reason:
            first_reason = decision.reason
    if not allowed:
        raise _denied(metrics, first_reason or "no_rule")
    return allowed


def _denied(metrics: Metrics, reason: str) -> Refusal:
    metrics.policy_denials.labels(reason).inc()
    return Refusal(s5.NOT_ALLOWED, "denied", f"policy: {reason}")


class Refusal(RelayError):
    """The exit will not or cannot open a stream: ``code`` is the SOCKS5 reply the worker
    (and its client) gets, ``reason`` the stream's result in relay_streams_total, ``why``
    what the log says."""

    code: int

    def __init__(self, code: int, result: str, why: str) -> None:
        super().__init__(why, code=code, reason=result)
        self.why = why


def connect_error(error: Optional[BaseException]) -> tuple[int, str]:
    if isinstance(error, asyncio.TimeoutError):
        return s5.HOST_UNREACHABLE, "connect timed out"
    if isinstance(error, ConnectionRefusedError):
        return s5.CONNECTION_REFUSED, "connection refused"
    if isinstance(error, OSError):
        if error.errno == errno.ENETUNREACH:
            return s5.NETWORK_UNREACHABLE, "network unreachable"
        if error.errno == errno.EHOSTUNREACH:
            return s5.HOST_UNREACHABLE, "host unreachable"
        return s5.GENERAL_FAILURE, str(error)
    return s5.GENERAL_FAILURE, "no address to dial"
