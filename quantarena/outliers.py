"""Activation outlier statistics per layer input, before and after SmoothQuant smoothing.

For every smooth group (the Linears that share one input) of every block: the largest and the median
per-channel absmax of the input, their ratio, and the excess kurtosis of all its values; and the same
after dividing by the SmoothQuant scales ``s`` (computed, not applied: per-channel absmax and the
moments of ``x / s`` follow exactly from those of ``x``). Large ratios and kurtosis are what make
per-tensor and per-token int8 activations lose accuracy.
"""
from __future__ import annotations

import torch

from .algorithms import smoothquant
from .calibration.sequential import BlockContext, run_sequential
from .calibration.stats import InputStats, observe
from .models import ArchSpec
from .quantize import block_groups


def _tensor_kurtosis(stats: InputStats, s: torch.Tensor | None = None) -> float:
    """Excess kurtosis of all values of ``x / s`` (one distribution over tokens and channels)."""
    n = max(stats.tokens, 1)
    d = torch.ones_like(stats.moment[0]) if s is None else s.double()
    m1, m2, m3, m4 = ((stats.moment[k] / n / d ** (k + 1)).mean() for k in range(4))
    var = m2 - m1 ** 2
    m4c = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
    return float(m4c / var.clamp(min=1e-30) ** 2 - 3.0)


def _row(absmax: torch.Tensor) -> dict:
    top, median = absmax.max().item(), absmax.median().item()
    return {"max": top, "median": median, "ratio": top / max(median, 1e-12)}


@torch.no_grad()
def outlier_stats(model: torch.nn.Module, arch: ArchSpec, windows: torch.Tensor, alpha: float = 0.5,
                  progress: bool = True) -> list[dict]:
    """One row per (block, group): ``{"block", "layers", "before": {max, median, ratio, kurtosis},
    "after": {...}}``; the model is left unchanged."""
    rows: list[dict] = []

    def process(ctx: BlockContext) -> dict:
        groups = block_groups(arch)
        stats = {g: InputStats(moments=True) for g in groups}
        observe(ctx, {g.linears[0]: (ctx.block.get_submodule(g.linears[0]), stats[g]) for g in groups})
        for g in groups:
            st = stats[g]
            linears = [ctx.block.get_submodule(n) for n in g.linears]
            s = smoothquant.smooth_scales(st.absmax, smoothquant.weight_absmax(linears), alpha)
            rows.append({"block": ctx.index, "layers": ",".join(n.rpartition(".")[2] for n in g.linears),
                         "before": _row(st.absmax) | {"kurtosis": _tensor_kurtosis(st)},
                         "after": _row(st.absmax / s) | {"kurtosis": _tensor_kurtosis(st, s)}})
        return {}
    run_sequential(model, arch, windows, process, progress=progress, desc="outliers")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'block':>5} {'layers':<24} {'max/median':>11} {'kurtosis':>9}   {'smoothed max/median':>19} "
             f"{'kurtosis':>9}"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"{r['block']:>5} {r['layers']:<24} {b['ratio']:>11.1f} {b['kurtosis']:>9.1f}   "
                     f"{a['ratio']:>19.1f} {a['kurtosis']:>9.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """PNG: max/median channel ratio per layer input, before and after smoothing (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(dict.fromkeys(r["layers"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for kind in kinds:
        sel = [r for r in rows if r["layers"] == kind]
        blocks_ = [r["block"] for r in sel]
        line, = axes[0].plot(blocks_, [r["before"]["ratio"] for r in sel], marker="o", label=kind)
        axes[0].plot(blocks_, [r["after"]["ratio"] for r in sel], ls="--", marker="x", color=line.get_color())
        axes[1].plot(blocks_, [max(r["before"]["kurtosis"], 1e-2) for r in sel], marker="o", color=line.get_color())
        axes[1].plot(blocks_, [max(r["after"]["kurtosis"], 1e-2) for r in sel], ls="--", marker="x",
                     color=line.get_color())
    axes[0].set_ylabel("largest / median channel absmax")
    axes[1].set_ylabel("excess kurtosis")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
    axes[0].legend(title="input of (solid: raw, dashed: smoothed)", fontsize=8)
    fig.suptitle(title or "activation outliers before and after SmoothQuant smoothing")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
