"""The atheris harness (tests/fuzz/fuzz_codecs.py, run by `make fuzz`) stays runnable: its
seeds and a few thousand generated inputs go through ``one_input`` here without atheris."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_codecs.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_codecs", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HARNESS_MODULE = load()


def test_seeds_cover_every_target_and_pass() -> None:
    seeds = HARNESS_MODULE.seeds()
    targets = {data[0] % len(HARNESS_MODULE.TARGETS) for data in seeds.values()}
    assert targets == set(range(len(HARNESS_MODULE.TARGETS)))
    for data in seeds.values():
        HARNESS_MODULE.one_input(data)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=400))
def test_random_inputs_raise_nothing_but_protocol_errors(data: bytes) -> None:
    HARNESS_MODULE.one_input(data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(HARNESS_MODULE.seeds().values())), st.data())
def test_mutated_seeds_raise_nothing_but_protocol_errors(seed: bytes, data: st.DataObject) -> None:
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255)) if pos > 1 else buf[pos]
    HARNESS_MODULE.one_input(bytes(buf))
