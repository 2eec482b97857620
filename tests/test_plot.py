"""The one co-activation heatmap renderer, and both commands that write a heatmap going through it."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from c2r_comm.cli import plan_cmd, profile_cmd
from c2r_comm.placement import plot
from c2r_comm.plan import PlacementPlan
from c2r_comm.routing.collaboration import coactivation_counts
from c2r_comm.routing.trace import RoutingTrace
from c2r_comm.topology import Topology

pytest.importorskip("matplotlib")


def _run(cmd, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    return cmd.run(parser.parse_args(argv))


def test_heatmap_orders_experts_by_rank_and_draws_log_counts():
    plt = plot.pyplot()
    counts = np.arange(16, dtype=np.int64).reshape(4, 4)
    plan = PlacementPlan((1, 0, 1, 0), 2)  # rank 0 hosts experts 1, 3; rank 1 hosts 0, 2
    fig, ax = plt.subplots()
    plot.draw_coactivation_heatmap(ax, counts, plan, Topology(1, 2), "t")
    order = [1, 3, 0, 2]
    assert np.allclose(ax.images[0].get_array(), np.log1p(counts[np.ix_(order, order)]))
    assert len(ax.lines) == 2  # one GPU boundary, horizontal and vertical
    with pytest.raises(ValueError, match=r"must be \[4, 4\]"):
        plot.draw_coactivation_heatmap(ax, counts[:3, :3], plan, Topology(1, 2), "t")
    plt.close(fig)


def test_profile_and_plan_commands_draw_through_the_one_renderer(tmp_path, monkeypatch):
    trace = RoutingTrace.synthetic(1500, 8, 2, num_layers=2, num_clusters=2, seed=3)
    trace.save(tmp_path / "t.npz")
    calls = []
    real = plot.draw_coactivation_heatmap

    def spy(ax, counts_EE, plan, topology, title):
        calls.append(np.asarray(counts_EE).copy())
        real(ax, counts_EE, plan, topology, title)

    monkeypatch.setattr(plot, "draw_coactivation_heatmap", spy)
    heat = tmp_path / "h.png"
    assert _run(profile_cmd, ["--trace", str(tmp_path / "t.npz"), "--topology", "1x2", "--heatmap", str(heat),
                              "--heatmap-layer", "1"]) == 0
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(calls) == 1 and np.array_equal(calls[0], coactivation_counts(trace.layer(1), 8))
    out = tmp_path / "p.json"
    assert _run(plan_cmd, ["--trace", str(tmp_path / "t.npz"), "--topology", "1x2", "--method", "contiguous",
                           "--layers", "1", "--out", str(out)]) == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(calls) == 2 and calls[1].shape == (8, 8)
