"""Shared pytest options (the long modes of the fuzz and fault-injection tests, docs/reliability.md) and
the `no_launch` fixture of the in-process "refused before any rank starts" tests."""
from __future__ import annotations

import pytest

FAULT_REPEATS_LONG = 20


def pytest_addoption(parser):
    group = parser.getgroup("fuzz", "dispatcher fuzzing (tests/test_fuzz_dispatch.py)")
    group.addoption("--fuzz-long", action="store_true", default=False,
                    help="long fuzz run: thousands of hypothesis examples per world size (CI runs a bounded number)")
    group.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per world size for the dispatcher fuzz tests (overrides CI / long counts)")
    group.addoption("--fuzz-seed", type=int, default=None, metavar="S",
                    help="hypothesis seed for the dispatcher fuzz tests (CI default: a fixed seed; "
                         "--fuzz-long default: a random seed, printed)")
    group = parser.getgroup("faults", "fault injection (tests/test_faults.py)")
    group.addoption("--faults-long", action="store_true", default=False,
                    help=f"repeat every fault-injection case {FAULT_REPEATS_LONG} times and run the long-only cases")


def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: dispatcher fuzz test; --fuzz-long / --fuzz-examples lift its time limit")
    config.addinivalue_line("markers", "faults: fault-injection test; --faults-long lifts its time limit")


def pytest_collection_modifyitems(config, items):
    fuzz_long = config.getoption("--fuzz-long") or config.getoption("--fuzz-examples") is not None
    faults_long = config.getoption("--faults-long")
    for item in items:  # a long run takes up to hours, not the CI limit
        if (fuzz_long and item.get_closest_marker("fuzz") is not None) or \
                (faults_long and item.get_closest_marker("faults") is not None):
            item.add_marker(pytest.mark.timeout(0))


@pytest.fixture
def faults_repeat(request) -> int:
    """How many times each fault-injection case runs (1 in CI, FAULT_REPEATS_LONG with --faults-long)."""
    return FAULT_REPEATS_LONG if request.config.getoption("--faults-long") else 1


@pytest.fixture
def no_launch(monkeypatch):
    """Commands run in this (unlaunched) process through `c2r_comm.cli.main`; starting a rank, a
    torchrun relaunch or an emulated node fails the test, so "refused before any rank starts" (and
    "before any namespace exists") is checked directly, without a subprocess's torch import."""
    from c2r_comm.bench import netns
    from c2r_comm.cli import bench_cmd, emulate_cmd, train_demo_cmd

    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)

    def launch(*args, **kwargs):
        raise AssertionError(f"a rank was started: {args}")
    # the launch and, for a world of one, this process becoming the rank
    for name in ("_launch_local_ranks", "_run_this_rank", "run_local_ranks"):
        monkeypatch.setattr(bench_cmd, name, launch)
    for name in ("_run_this_rank", "run_local_ranks"):
        monkeypatch.setattr(train_demo_cmd, name, launch)
    for name in ("start_ranks", "_plain_run"):
        monkeypatch.setattr(emulate_cmd, name, launch)
    for name in ("create_nodes", "remove_stale"):
        monkeypatch.setattr(netns, name, launch)
