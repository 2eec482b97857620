"""PNGs of a sweep's records (sweep.json "records"): matplotlib is optional (`pip install c2r-comm[plot]`)
and imported only here, when plotting.

    time.png     total step time (median, p10-p90 whiskers) per dispatcher, grouped by placement; one
                 panel per topology / routing / inter-node rate
    bytes.png    MB per forward (dispatch + combine, all ranks) per dispatcher x placement, same-node
                 and cross-node stacked; one panel per topology / routing (bytes do not depend on rate)
    speedup.png  speed-up of each dispatcher x placement over alltoall + contiguous; panels as time.png
    rate.png     with >= 2 inter-node rates: total time vs rate (log x) per dispatcher x placement, one
                 panel per topology / routing; unshaped runs are dashed horizontal lines. Where a line is
                 flat the step is CPU-bound; where it rises as the rate falls, it is link-bound.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from c2r_comm.bench.sweep_report import cell_group, rate_text, speedup_vs_baseline, total_ms
from c2r_comm.placement.plot import matplotlib_available, pyplot


def require_matplotlib() -> None:
    """ValueError saying how to get matplotlib (or skip the plots) when it is not installed."""
    if not matplotlib_available():
        raise ValueError("sweep plots need matplotlib, which is not installed: pip install 'c2r-comm[plot]' "
                         "(or pass --no-plots)")


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _panels(plt: Any, keys: list, title: Callable[[Any], str]) -> tuple[Any, list]:
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(flat, keys):
        ax.set_title(title(key), fontsize=9)
    return fig, flat[:len(keys)]


def _group_title(key: tuple) -> str:
    topology, routing, rate = key
    return f"{topology}, {routing}" + ("" if rate is None else f", {rate:g} Gbit/s")


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_times(records: Sequence[dict], path: Path) -> Path:
    plt = pyplot()
    keys = _ordered(cell_group(r) for r in records)
    fig, axes = _panels(plt, keys, lambda k: _group_title(k) + (" (unshaped)" if k[2] is None and
                                                                records[0]["sweep"]["emulate"] else ""))
    dispatchers = _ordered(r["sweep"]["dispatcher"] for r in records)
    width = 0.8 / len(dispatchers)
    for ax, key in zip(axes, keys):
        rs = [r for r in records if cell_group(r) == key]
        placements = _ordered(r["sweep"]["placement"] for r in rs)
        for j, d in enumerate(dispatchers):
            xs, ys, lo, hi = [], [], [], []
            for i, p in enumerate(placements):
                for r in rs:
                    if (r["sweep"]["dispatcher"], r["sweep"]["placement"]) == (d, p):
                        t = r["measurement"]["total"]
                        xs.append(i + (j - (len(dispatchers) - 1) / 2) * width)
                        ys.append(t["median_ms"])
                        lo.append(max(t["median_ms"] - t["p10_ms"], 0.0))
                        hi.append(max(t["p90_ms"] - t["median_ms"], 0.0))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=d)
        ax.set_xticks(range(len(placements)), placements, fontsize=8)
        ax.set_ylabel("fwd+bwd ms (median, p10-p90)")
        ax.legend(fontsize=7)
    fig.suptitle("total step time per dispatcher x placement")
    return _save(fig, plt, path)


def _combo(r: dict) -> str:
    return f"{r['sweep']['dispatcher']}\n{r['sweep']['placement']}"


def plot_bytes(records: Sequence[dict], path: Path) -> Path:
    plt = pyplot()
    keys = _ordered(cell_group(r)[:2] for r in records)
    fig, axes = _panels(plt, keys, lambda k: f"{k[0]}, {k[1]}")
    for ax, key in zip(axes, keys):
        rs = [r for r in records if cell_group(r)[:2] == key]
        first_rate = cell_group(rs[0])[2]
        rs = [r for r in rs if cell_group(r)[2] == first_rate]  # bytes are the same at every rate
        labels = [_combo(r) for r in rs]
        mb = {link: [(r["measurement"]["dispatch"][f"bytes_{link}"] + r["measurement"]["combine"][f"bytes_{link}"])
                     / 1e6 for r in rs] for link in ("same_node", "cross_node")}
        ax.bar(range(len(rs)), mb["same_node"], label="same-node")
        ax.bar(range(len(rs)), mb["cross_node"], bottom=mb["same_node"], label="cross-node")
        ax.set_xticks(range(len(rs)), labels, fontsize=7)
        ax.set_ylabel("MB per forward (dispatch + combine, all ranks)")
        ax.legend(fontsize=7)
    fig.suptitle("bytes per link class")
    return _save(fig, plt, path)


def plot_speedup(records: Sequence[dict], path: Path) -> Path:
    plt = pyplot()
    speedup = speedup_vs_baseline(records)
    keys = _ordered(cell_group(r) for r in records)
    fig, axes = _panels(plt, keys, _group_title)
    for ax, key in zip(axes, keys):
        rs = [r for r in records if cell_group(r) == key and speedup[id(r)] is not None]
        if not rs:
            ax.text(0.5, 0.5, "no alltoall + contiguous baseline here", ha="center", transform=ax.transAxes)
            continue
        ax.bar(range(len(rs)), [speedup[id(r)] for r in rs])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(rs)), [_combo(r) for r in rs], fontsize=7)
        ax.set_ylabel("speed-up vs alltoall + contiguous")
    fig.suptitle("speed-up of fwd+bwd over the baseline (alltoall, contiguous placement)")
    return _save(fig, plt, path)


def plot_rates(records: Sequence[dict], path: Path) -> Path:
    plt = pyplot()
    keys = _ordered(cell_group(r)[:2] for r in records)
    fig, axes = _panels(plt, keys, lambda k: f"{k[0]}, {k[1]}")
    unshaped_fallback = sum(1 for r in records if rate_text(r).endswith("*"))
    for ax, key in zip(axes, keys):
        rs = [r for r in records if cell_group(r)[:2] == key]
        for i, combo in enumerate(_ordered(_combo(r) for r in rs)):
            color = f"C{i % 10}"
            line = sorted((r["sweep"]["inter_node_gbit"], total_ms(r)) for r in rs
                          if _combo(r) == combo and r["sweep"]["inter_node_gbit"] is not None)
            label = combo.replace("\n", " + ")
            if line:
                ax.plot([x for x, _ in line], [y for _, y in line], "o-", color=color, label=label)
                label = None
            for r in rs:
                if _combo(r) == combo and r["sweep"]["inter_node_gbit"] is None:
                    ax.axhline(total_ms(r), color=color, ls="--", lw=1, label=label and label + " (unshaped)")
        ax.set_xscale("log")
        rates = sorted({r["sweep"]["inter_node_gbit"] for r in rs} - {None})
        ax.set_xticks(rates, [f"{x:g}" for x in rates])
        ax.minorticks_off()
        ax.set_xlabel("inter-node link, Gbit/s each way (dashed: unshaped)")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.legend(fontsize=7)
    note = f"\n({unshaped_fallback} cells ran unshaped: emulation was unavailable)" if unshaped_fallback else ""
    fig.suptitle("step time vs inter-node rate\nflat: CPU-bound; rising as the rate falls: link-bound" + note,
                 fontsize=9)
    return _save(fig, plt, path)


def save_sweep_plots(records: Sequence[dict], out_dir: Path) -> list[Path]:
    """Every plot that the records support, into out_dir; returns the paths written."""
    if not records:
        return []
    require_matplotlib()
    out_dir = Path(out_dir)
    paths = [plot_times(records, out_dir / "time.png"), plot_bytes(records, out_dir / "bytes.png"),
             plot_speedup(records, out_dir / "speedup.png")]
    if len({r["sweep"]["inter_node_gbit"] for r in records}) >= 2:
        paths.append(plot_rates(records, out_dir / "rate.png"))
    return paths
