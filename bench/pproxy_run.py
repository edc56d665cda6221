"""Run pproxy on uvloop: pproxy calls ``uvloop.install()`` then ``asyncio.get_event_loop()``,
which current uvloop answers with an error (no loop set yet); install the policy *and* a
loop, then hand over to pproxy's own main with the command line unchanged."""

from __future__ import annotations

import asyncio
import sys

import uvloop


def _install() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())


uvloop.install = _install

if __name__ == "__main__":
    from pproxy.server import main

    sys.argv[0] = "pproxy"
    sys.exit(main())
