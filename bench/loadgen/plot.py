"""The latency-vs-load chart for docs/performance.md (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: only ever writes files
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter

__all__ = ["latency_vs_load", "soak_over_time"]

_PANELS = (("fanout", "fanout (one room)"), ("cross", "cross (2 hosts)"), ("direct", "direct 1:1"))


def latency_vs_load(results: dict[str, dict[str, dict[str, Any]]], p99_limit_ms: float, path: Path) -> None:
    """One panel per ramp scenario: p99 (solid) and p50 (dotted) latency per step, per server."""
    panels = [(key, title) for key, title in _PANELS if any(key in r for r in results.values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for index, (server, by_scenario) in enumerate(results.items()):
            steps = [s for s in by_scenario.get(key, {}).get("steps") or [] if not s.get("retried")]
            if not steps:
                continue
            color = f"C{index}"  # one colour per server across panels
            xs = [s["deliveries_per_s"] for s in steps]
            p99 = [s["latency"]["p99_ms"] for s in steps]
            ax.plot(xs, p99, marker="o", color=color, label=server)
            ax.plot(xs, [s["latency"]["p50_ms"] for s in steps], ls=":", color=color)
        ax.axhline(p99_limit_ms, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="deliveries/s", ylabel="latency ms (p99 solid, p50 dotted)")
        # Both axes log: the rate grows geometrically and latency spans 1 to 1000 ms.
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def soak_over_time(result: dict[str, Any], path: Path) -> None:
    """RSS, open fds (per server process) and longest loop stall (per worker) against time."""
    samples = result["samples"]
    if not samples:
        return
    ts = [s["t"] for s in samples]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = (("rss_mib", "RSS MiB"), ("fds", "open file descriptors"))
    for ax, (key, label) in zip(axes[:2], panels, strict=True):
        for pid in samples[0]["processes"]:
            ax.plot(ts, [s["processes"].get(pid, {}).get(key) for s in samples], label=f"pid {pid}")
        ax.set(title=label, xlabel="seconds", ylim=(0, None))
    for pid in samples[0]["longest_stall_ms"]:
        axes[2].plot(ts, [s["longest_stall_ms"].get(pid) for s in samples], label=f"worker {pid}")
    axes[2].set(title="longest ping round trip per interval (ms)", xlabel="seconds", ylim=(0, None))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"soak: {result['opened']:,} sockets, {result['rooms']} rooms, {result['rate']:g} publishes/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
