"""How addresses are written in logs and messages: IPv6 hosts in brackets."""

from __future__ import annotations


def format_hostport(host: object, port: object) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"
