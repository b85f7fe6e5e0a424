"""The decode benchmark as a picture: tokens/s per scheme across batch sizes, and each scheme's speed-up over
bf16, with the measured crossover marked. Reads the object ``quantarena bench decode --json`` writes."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_path

COLORS = {"bf16": "#555555", "w4a16": "#1f77b4", "w8a8-int8": "#d62728", "fp8": "#2ca02c"}


def plot_decode(result: dict, path: str | Path) -> Path:
    """Write a PNG: left, decode tokens/s vs batch (log-log); right, speed-up over bf16 vs batch."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        raise ValueError("the decode result has no rows to plot")
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    tok = {(r["scheme"], r["batch"]): r["decode_tok_s"] for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in schemes:
        batches = sorted(b for (t, b) in tok if t == s)
        color = COLORS.get(s)
        left.plot(batches, [tok[(s, b)] for b in batches], "o-", label=s, color=color)
        if s != "bf16":
            shared = [b for b in batches if ("bf16", b) in tok]
            right.plot(shared, [tok[(s, b)] / tok[("bf16", b)] for b in shared], "o-", label=s, color=color)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decode batch (sequences)")
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("decode tokens / s")
    right.axhline(1.0, color=COLORS["bf16"], lw=1)
    right.set_ylabel("speed-up over bf16")
    for scheme, batch in (result.get("crossover") or {}).items():
        if batch is not None:
            right.axvline(batch, color=COLORS.get(scheme, "k"), ls=":", lw=1)
    right.set_title("dotted: batch where the 8-bit scheme overtakes W4A16", fontsize=9)
    left.legend()
    fig.suptitle(f"{result.get('model', '')} on {result.get('device', '')} ({result.get('date', '')})", fontsize=10)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_path(path, write, is_dir=False)
    finally:
        plt.close(fig)
