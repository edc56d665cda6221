"""No asyncio object is made outside the loop that uses it.

Before Python 3.10, ``asyncio.Lock``, ``Event``, ``Semaphore``, ``Condition``, ``Queue`` and
``Future`` bind to ``asyncio.get_event_loop()`` when they are created. The commands build their
daemons before ``asyncio.run``, so one such object made in an ``__init__`` bound to the wrong
loop (its first wait failed with "attached to a different loop") or, under uvloop's policy,
killed the command at start ("There is no current event loop"). Two guards:

- a static check over ``relay/`` and ``glidein_wrapper/``: no such object is made at module
  level, in a class body, in ``__init__`` or in a default argument (``relay.loopbound`` makes
  them on first use instead), and nothing calls ``get_event_loop()``;
- the daemons' objects built outside any loop under uvloop's and asyncio's policies, then
  run, with their locks, events and semaphores contended, inside one.
"""

from __future__ import annotations

import ast
import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import asyncssh
import pytest

from glidein_wrapper.supervisor import Signals
from relay.config.values import HostPort, LoginTarget, parse_rule
from relay.exit.daemon import RelayExit
from relay.exit.settings import ExitSettings
from relay.exit.supervisor import Supervisor
from relay.net.loopbound import LoopBound
from relay.net.sshhop import SshUnavailable
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("relay", "glidein_wrapper")

LOOP_BOUND = frozenset(
    {
        "Lock",
        "Event",
        "Condition",
        "Semaphore",
        "BoundedSemaphore",
        "Queue",
        "PriorityQueue",
        "LifoQueue",
        "Future",
        "Barrier",
        "ensure_future",
    }
)
"""asyncio names that bind to a loop when called (ensure_future: when given a coroutine)."""

EAGER_METHODS = frozenset({"__init__", "__new__", "__post_init__", "__init_subclass__"})


class _Finder(ast.NodeVisitor):
    """Calls that make an asyncio object where no running loop is guaranteed."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.modules = {"asyncio"}
        self.members: dict[str, str] = {}  # local name -> asyncio name
        self.eager = True  # code that runs on import or when an object is built
        self.where = "module level"
        self.in_class = False
        self.found: list[str] = []

    def _asyncio_name(self, node: ast.expr) -> Optional[str]:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in self.modules
        ):
            return node.attr
        if isinstance(node, ast.Name):
            return self.members.get(node.id)
        return None

    def _report(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.filename}:{getattr(node, 'lineno', 0)}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "asyncio":
                self.modules.add(alias.asname or "asyncio")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "asyncio":
            for alias in node.names:
                self.members[alias.asname or alias.name] = alias.name

    def _scope(self, body: list[ast.stmt], eager: bool, where: str, in_class: bool) -> None:
        saved = self.eager, self.where, self.in_class
        self.eager, self.where, self.in_class = eager, where, in_class
        for stmt in body:
            self.visit(stmt)
        self.eager, self.where, self.in_class = saved

    def _defaults(self, args: ast.arguments) -> None:
        # Default values are evaluated when the def runs: in the enclosing scope.
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                saved = self.eager, self.where
                if self.eager:
                    self.where = f"{self.where} (a default argument)"
                self.visit(default)
                self.eager, self.where = saved

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._defaults(node.args)
        if self.in_class and node.name in EAGER_METHODS and not self._asks_for_the_loop(node):
            self._scope(node.body, True, f"{node.name}()", False)
        else:
            self._scope(node.body, False, f"{node.name}()", False)

    visit_AsyncFunctionDef = visit_FunctionDef

    def _asks_for_the_loop(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        """An __init__ that calls get_running_loop() fails loudly outside a loop, on every
        Python: such objects are built in one (carriers, TLS links)."""
        return any(
            isinstance(sub, ast.Call) and self._asyncio_name(sub.func) == "get_running_loop"
            for sub in ast.walk(node)
        )

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._defaults(node.args)
        saved = self.eager
        self.eager = False  # runs when called
        self.visit(node.body)
        self.eager = saved

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._scope(node.body, self.eager, f"class body of {node.name}", True)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._asyncio_name(node.func)
        if name == "get_event_loop" or (
            isinstance(node.func, ast.Attribute) and node.func.attr == "get_event_loop"
        ):
            self._report(node, "get_event_loop() (use asyncio.get_running_loop() in the loop)")
        elif name in LOOP_BOUND and self.eager:
            self._report(node, f"asyncio.{name}() made at {self.where}")
        for keyword in node.keywords:
            # dataclasses.field(default_factory=asyncio.Event): made by the generated __init__
            if keyword.arg == "default_factory":
                factory = self._asyncio_name(keyword.value)
                if factory in LOOP_BOUND:
                    self._report(node, f"asyncio.{factory} as a dataclass default_factory")
        self.generic_visit(node)


def loop_bound_violations(source: str, filename: str = "<source>") -> list[str]:
    finder = _Finder(filename)
    finder.visit(ast.parse(source, filename))
    return finder.found


def test_no_asyncio_object_is_made_outside_a_running_loop() -> None:
    found = []
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 20
    for path in files:
        found += loop_bound_violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, (
        "asyncio objects made before the loop runs (on Python 3.9 they bind to another loop, "
        "and uvloop refuses them): make them with relay.net.loopbound.LoopBound or inside a "
        "coroutine\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    ("source", "count"),
    [
        # the shape that broke relay-worker --login on 3.9 under uvloop
        ("import asyncio\nclass SshHop:\n    def __init__(self):\n"
         "        self._lock = asyncio.Lock()\n", 1),
        ("import asyncio\nQUEUE = asyncio.Queue()\n", 1),
        ("import asyncio\nclass C:\n    ready = asyncio.Event()\n", 1),
        ("import asyncio\ndef f(done=asyncio.Future()):\n    pass\n", 1),
        ("from asyncio import Semaphore as S\nclass C:\n    def __init__(self):\n"
         "        self.s = S(4)\n        self.c = [S(1) for _ in range(2)]\n", 2),
        ("import asyncio as aio\nclass C:\n    def __init__(self):\n"
         "        self.e = aio.Condition()\n", 1),
        ("import asyncio, dataclasses\n@dataclasses.dataclass\nclass C:\n"
         "    e: object = dataclasses.field(default_factory=asyncio.Event)\n", 1),
        ("import asyncio\nasync def f():\n    return asyncio.get_event_loop()\n", 1),
        # made on first use, inside the loop
        ("import asyncio\nfrom relay.loopbound import LoopBound\nclass C:\n"
         "    lock = LoopBound(asyncio.Lock)\n"
         "    slots = LoopBound(lambda: asyncio.Semaphore(4))\n", 0),
        ("import asyncio\nclass C:\n    def __init__(self):\n        self.e = None\n"
         "    async def start(self):\n        self.e = asyncio.Event()\n"
         "        self.f = asyncio.get_running_loop().create_future()\n", 0),
        ("import asyncio\nclass C:\n    def __init__(self):\n"
         "        self.f = asyncio.get_running_loop().create_future()\n"
         "        self.e = asyncio.Event()\n", 0),
        ("import asyncio\nclass C:\n    def __init__(self, loop):\n"
         "        self.f = loop.create_future()\n"
         "        self.e = asyncio.ensure_future(self.run())\n", 1),
    ],
)  # fmt: skip
def test_the_static_check_finds_what_binds_too_early(source: str, count: int) -> None:
    assert len(loop_bound_violations(source)) == count, loop_bound_violations(source)


@pytest.fixture(params=["uvloop", "asyncio"])
def policy_outside_a_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh event loop policy with no loop set, as in a command before asyncio.run."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        fresh: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
    else:
        fresh = asyncio.DefaultEventLoopPolicy()
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(fresh)
    try:
        yield request.param
    finally:
        asyncio.set_event_loop_policy(old)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_daemon_objects_built_before_the_loop_work_inside_it(
    policy_outside_a_loop: str, tmp_path: Path
) -> None:
    if policy_outside_a_loop == "uvloop" and sys.version_info < (3, 10):
        # The hazard is real here: this is what SshHop.__init__ used to do.
        with pytest.raises(RuntimeError, match="no current event loop"):
            asyncio.Lock()
    key = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    closed = _free_port()  # nothing listens: every SSH attempt fails at once
    keys, secret = tmp_path / "exit.keys", tmp_path / "secret"
    keys.write_text("worker-1 " + "0" * 32 + "\n")
    secret.write_text("0" * 32)
    keys.chmod(0o600)
    secret.chmod(0o600)

    # Built as the commands build them: before any loop runs.
    relay_exit = RelayExit(
        ExitSettings(
            listen=HostPort("127.0.0.1", 0),
            keys=keys,
            allow=(parse_rule("192.0.2.0/24:80"),),
        )
    )
    worker = RelayWorker(
        WorkerSettings(
            socks=HostPort("127.0.0.1", 0),
            login=(LoginTarget("relay", "127.0.0.1", closed),),
            ssh_key=key,
            known_hosts=known_hosts,
            exit=(HostPort("127.0.0.1", closed),),
            key_id="worker-1",
            secret_file=secret,
            connect_timeout=2,
            carriers=2,
        )
    )
    supervisor = Supervisor(["--workers", "2"], 2, "127.0.0.1", 0, None)
    signals = Signals()

    async def inside() -> None:
        await relay_exit.start()
        await worker.start()
        try:
            # Two streams wanting the SSH connection at once: one attempt, the other waits
            # on the lock, then both see the login node fail.
            assert worker.ssh is not None
            results = await asyncio.gather(
                worker.ssh.connection(), worker.ssh.connection(), return_exceptions=True
            )
            assert all(isinstance(r, SshUnavailable) for r in results), results

            # The worker's carrier keepers wait on their events from inside the loop.
            (client,) = worker.exits.values()
            assert not client.ready.is_set()
            client._wake.set()
            await asyncio.sleep(0)

            for event in (supervisor._wake, supervisor.children[0].ready, signals.arrived):
                asyncio.get_running_loop().call_soon(event.set)
                await asyncio.wait_for(event.wait(), 5)
        finally:
            await worker.stop()
            await relay_exit.stop()

    asyncio.run(inside())


def test_loop_bound_attributes_are_per_instance_and_per_loop() -> None:
    class Holder:
        event = LoopBound(asyncio.Event)

    async def first_use(holder: Holder) -> asyncio.Event:
        return holder.event

    a, b = Holder(), Holder()
    with pytest.raises(RuntimeError, match=r"Holder\.event .* inside the running event loop"):
        a.event  # noqa: B018 - outside a loop it refuses to be made
    event_a = asyncio.run(first_use(a))
    assert asyncio.run(first_use(a)) is event_a  # made once, then an ordinary attribute
    assert asyncio.run(first_use(b)) is not event_a
    assert isinstance(Holder.event, LoopBound)
