"""Shared pytest options."""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    _add_fault_options(parser)
    group = parser.getgroup("fuzz", "dispatcher fuzzing (tests/test_fuzz_dispatch.py)")
    group.addoption("--fuzz-long", action="store_true", default=False,
                    help="long fuzz run: thousands of hypothesis examples per world size (CI runs a bounded number)")
    group.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per world size for the dispatcher fuzz tests (overrides CI / long counts)")
    group.addoption("--fuzz-seed", type=int, default=None, metavar="S",
                    help="hypothesis seed for the dispatcher fuzz tests (CI default: a fixed seed; "
                         "--fuzz-long default: a random seed, printed)")


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: dispatcher fuzz test; --fuzz-long / --fuzz-examples lift its time limit")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("--fuzz-long") or config.getoption("--fuzz-examples") is not None:
        for item in items:
            if item.get_closest_marker("fuzz") is not None:
                item.add_marker(pytest.mark.timeout(0))  # a long run takes hours, not the CI limit


def _add_fault_options(parser):  # called from pytest_addoption below
    group = parser.getgroup("faults", "fault injection (tests/test_faults.py)")
    group.addoption("--faults-long", action="store_true", default=False,
                    help="repeat every fault-injection case 20 times and run the long-only cases")


def _faults_repeat(config) -> int:
    return 20 if config.getoption("--faults-long") else 1



@pytest.fixture
def faults_repeat(request) -> int:
    """How many times each fault-injection case runs (1 in CI, 20 with --faults-long)."""
    return _faults_repeat(request.config)
