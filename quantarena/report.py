"""The advisor's result as one self-contained HTML page (plots embedded as base64 PNG, no external
links) plus a Markdown summary and the JSON, written atomically into a folder."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from .advisor import Advice, format_table, gpu_line

COLORS = {"bf16": "#555555", "w4a16": "#1f77b4", "w8a8": "#d62728", "fp8": "#2ca02c", "w4a8": "#9467bd"}


def _figure(width: float = 10.0, height: float = 4.2, cols: int = 1):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, cols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def _png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _family(scheme: str) -> str:
    from .advisor import family
    try:
        return family(scheme)
    except ValueError:
        return scheme


def _plain_ticks(ax) -> None:
    import math
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    lead = lambda v: round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if lead(v) in (2, 5) else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def plot_time(advice: Advice) -> str:
    """Step time and throughput vs batch per scheme: roofline with efficiencies (solid), ideal (dotted),
    measured (markers); curves stop at the memory limit; the W4A16 -> W8A8/FP8 crossovers marked."""
    fig, (ax, ax2) = _figure(11.0, 4.4, cols=2)
    limit = {m.scheme: m.max_batch for m in advice.memory}
    for i, (fam, ms) in enumerate(advice.curves_ms.items()):
        color, lw = COLORS.get(fam, None), max(3.2 - 0.6 * i, 1.2)  # thinner on top: equal curves stay visible
        cap = max(limit.get(fam, 0), 1)
        inside = [(b, t) for b, t in zip(advice.curve_batches, ms) if b <= cap]
        beyond = [(b, t) for b, t in zip(advice.curve_batches, ms) if b >= (inside[-1][0] if inside else 1)]
        for pts, style, alpha, label in ((inside, "-", 1.0, f"{fam} (model)"), (beyond, "--", 0.35, None)):
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=color, lw=lw, alpha=alpha, label=label)
                ax2.plot(xs, [1e3 * b / t for b, t in pts], style, color=color, lw=lw, alpha=alpha,
                         label=label and fam)
        if inside and beyond[1:]:
            ax.plot(*inside[-1], marker="|", ms=14, color=color)
        ax.plot(advice.curve_batches, advice.ideal_ms.get(fam, []), ":", color=color, lw=1)
    marks: dict[int, list[str]] = {}
    for c in advice.crossovers:
        if c.batch and "w4a16" in c.pair and c.faster_large in ("w8a8", "fp8"):
            marks.setdefault(c.batch, []).append(c.faster_large)
    for batch, names in marks.items():
        for a in (ax, ax2):
            a.axvline(batch, color=COLORS[names[0]], ls="--", lw=1)
    if marks:
        text = "\n".join(f"{' / '.join(names)} overtakes w4a16 at batch {batch}" for batch, names in sorted(marks.items()))
        ax.text(0.98, 0.03, text, transform=ax.transAxes, fontsize=8, ha="right", va="bottom",
                bbox=dict(facecolor="white", edgecolor="#999", alpha=0.9))
    seen: list[list[tuple[int, float]]] = []
    for scheme, pts in advice.measured_ms.items():
        if pts and pts not in seen:   # schemes of one family share the family's measured points
            seen.append(pts)
            scheme = _family(scheme)
            xs, ys = zip(*pts)
            color = COLORS.get(_family(scheme))
            ax.plot(xs, ys, "o", color=color, ms=5, mfc="white", label=f"{scheme} (measured)")
            ax2.plot(xs, [1e3 * b / t for b, t in pts], "o", color=color, ms=5, mfc="white")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("decode batch (sequences)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    _plain_ticks(ax)
    ax.set_ylabel("ms per decode step (= per token of each sequence)")
    ax.set_title(f"{advice.model} on {advice.gpu.name}, context {advice.context}\n"
                 "solid: model (measured GEMMs where given, else roofline), dotted: ideal roofline,\n"
                 "circles: measured decode, | then faded: past the memory limit", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax2.set_yscale("log")
    _plain_ticks(ax2)
    ax2.set_ylabel("tokens / s (all sequences)")
    ax2.set_title("throughput", fontsize=9)
    ax2.legend(fontsize=7, loc="upper left")
    return _png(fig)


def plot_memory(advice: Advice) -> str:
    """Weights + KV cache + runtime per scheme at the largest scenario batch, against usable memory."""
    fig, (ax,) = _figure(7.0, 3.6)
    names = [m.scheme for m in advice.memory]
    weights = [m.weights_gb for m in advice.memory]
    kv = [m.kv_gb for m in advice.memory]
    over = [m.overhead_gb for m in advice.memory]
    ax.bar(names, weights, color=[COLORS.get(n, "#888") for n in names], label="weights")
    ax.bar(names, kv, bottom=weights, color="#ffbf80", label=f"KV cache (batch {max(advice.batches)})")
    ax.bar(names, over, bottom=[w + k for w, k in zip(weights, kv)], color="#dddddd", label="runtime")
    usable = advice.memory[0].usable_gb if advice.memory else advice.gpu.memory_gb
    ax.axhline(usable, color="black", ls="--", lw=1)
    ax.text(len(names) - 0.5, usable, f" usable {usable:.0f} GB", va="bottom", ha="right", fontsize=8)
    tallest = max([w + k + o for w, k, o in zip(weights, kv, over)] + [usable])
    ax.set_ylim(0, tallest * 1.3)
    ax.set_ylabel("GB")
    ax.set_title(f"memory at batch {max(advice.batches)}, context {advice.context} on {advice.gpu.name}", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    return _png(fig)


def plot_accuracy(advice: Advice) -> str:
    """Perplexity increase and KL divergence per scheme, or a panel saying why there are none."""
    if not advice.accuracy:
        fig, (ax,) = _figure(9.0, 0.8)
        ax.axis("off")
        ax.text(0.0, 0.5, textwrap.fill(f"accuracy: {advice.accuracy_note}", 90), fontsize=10, va="center")
        return _png(fig)
    fig, axes = _figure(9.0, 3.4, cols=2)
    names = [s for s in advice.accuracy if s != "bf16"] or list(advice.accuracy)
    colors = [COLORS.get(_family(n), "#888") for n in names]
    axes[0].bar(names, [advice.accuracy[n]["ppl_increase_pct"] for n in names], color=colors)
    axes[0].set_ylabel("perplexity increase (%)")
    kld = [advice.accuracy[n].get("kld") or 0.0 for n in names]
    axes[1].bar(names, kld, color=colors)
    axes[1].set_ylabel("KL divergence (nats/token)")
    for a in axes:
        a.tick_params(axis="x", rotation=30, labelsize=8)
        a.grid(True, axis="y", alpha=0.3)
    fig.suptitle(textwrap.fill(f"accuracy: {advice.accuracy_note}", 110), fontsize=9)
    return _png(fig)


def plot_outliers(rows: list[dict], title: str = "") -> str:
    """The outlier plot of :func:`outliers.plot` (max/median channel absmax and kurtosis per layer input,
    before and after smoothing), as base64 PNG."""
    from .outliers import plot
    with tempfile.TemporaryDirectory() as tmp:
        path = plot(rows, str(Path(tmp) / "outliers.png"), title)
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)
    return ("<table><thead><tr>" + cells("th", header) + "</tr></thead><tbody>"
            + "".join("<tr>" + cells("td", r) + "</tr>" for r in rows) + "</tbody></table>")


def _decision_rows(advice: Advice) -> list[list[Any]]:
    return [[r.scenario, r.scheme or "nothing fits", r.why,
             f"{r.speedup:.2f}x" if r.speedup else "-", r.accuracy, r.export, r.source] for r in advice.rows]


DECISION_HEADER = ["scenario", "scheme", "why", "speed-up vs bf16", "accuracy cost", "export / engine", "numbers"]

CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.note{color:#555;font-size:13px}h1{font-size:22px}h2{font-size:17px;margin-top:28px}"""


def render_html(advice: Advice) -> str:
    """The whole report as one HTML string with every image inline."""
    g = advice.gpu
    find = lambda cs, key: next((c.batch for c in cs or [] if c.key == key), None) or "never"
    cross = [[c.key, c.describe()] + ([find(advice.roofline_crossovers, c.key)] if advice.roofline_crossovers else [])
             + [find(advice.ideal_crossovers, c.key)] for c in advice.crossovers]
    cross_header = (["pair", "model used (measured GEMMs where given)"]
                    + (["roofline alone"] if advice.roofline_crossovers else []) + ["ideal roofline"])
    mem = [[m.scheme, f"{m.weights_gb:.2f}", f"{m.kv_gb:.2f}", f"{m.total_gb:.2f}", "yes" if m.fits else "no",
            m.max_batch, m.gpus_needed] for m in advice.memory]
    images = [("Time per token vs batch", plot_time(advice)), ("Memory", plot_memory(advice)),
              ("Accuracy", plot_accuracy(advice))]
    if advice.outliers:
        images.append(("Activation outliers (why W8A8 needs smoothing)",
                       plot_outliers(advice.outliers, f"{advice.model}: activation outliers")))
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>quantarena advise: {html.escape(advice.model)} on {html.escape(g.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>quantarena advise: {html.escape(advice.model)} on {html.escape(g.name)}</h1>",
        f"<p class='note'>{html.escape(gpu_line(g))}. Numbers: "
        f"{html.escape(advice.source)}. Accuracy: {html.escape(advice.accuracy_note)}.</p>",
        "<h2>Decision</h2>", _table(DECISION_HEADER, _decision_rows(advice)),
        "<h2>Crossover batch per scheme pair</h2>",
        _table(cross_header, cross),
    ]
    if advice.measured_crossover is not None:
        parts.append(f"<p>Measured decode W4A16 &rarr; W8A8 crossover: {html.escape(str(advice.measured_crossover))}</p>")
    parts += [f"<h2>Memory at batch {max(advice.batches)}, context {advice.context}</h2>",
              _table(["scheme", "weights GB", "KV GB", "total GB", "fits", "max batch", "GPUs needed"], mem)]
    for title, png in images:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
    if advice.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in advice.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(advice: Advice) -> str:
    """The decision table, crossovers and memory as Markdown."""
    esc = lambda v: str(v).replace("|", "\\|")
    row = lambda cells: "| " + " | ".join(esc(c) for c in cells) + " |"
    lines = [f"# quantarena advise: {advice.model} on {advice.gpu.name}", "",
             f"Numbers: {advice.source}. Accuracy: {advice.accuracy_note}.", "",
             row(DECISION_HEADER), row(["---"] * len(DECISION_HEADER))]
    lines += [row(r) for r in _decision_rows(advice)]
    lines += ["", "## Crossover", ""] + [f"- {c.key}: {c.describe()}" for c in advice.crossovers]
    if advice.measured_crossover is not None:
        lines.append(f"- measured w4a16 -> w8a8: {advice.measured_crossover}")
    lines += ["", f"## Memory (batch {max(advice.batches)}, context {advice.context})", ""]
    lines += [f"- {m.scheme}: weights {m.weights_gb:.2f} GB, KV {m.kv_gb:.2f} GB, "
              f"{'fits' if m.fits else 'does not fit'}, max batch {m.max_batch}" for m in advice.memory]
    lines += [""] + [f"Note: {n}" for n in advice.notes]
    return "\n".join(lines) + "\n"


def write_report(advice: Advice, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``summary.md``, ``advice.json`` and ``advice.txt`` into ``out_dir``; files
    appear only when all were written (temporary folder, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = {"report.html": render_html(advice), "summary.md": render_markdown(advice),
                "advice.json": json.dumps(advice.to_dict(), indent=2, default=str),
                "advice.txt": format_table(advice) + "\n"}
    tmp = Path(tempfile.mkdtemp(prefix=".advise-", dir=out))
    try:
        for name, text in contents.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name in contents:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in contents}
