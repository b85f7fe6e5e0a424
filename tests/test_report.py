"""report: one self-contained HTML page with every plot inline, Markdown, JSON; rendered in Chromium
when it is installed."""
import json
import re
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")

from quantarena import advisor as A
from quantarena.report import render_html, render_markdown, write_report
from quantarena.models import preset_config
from quantarena.roofline import shape_from_config

LLAMA3_8B = shape_from_config(preset_config("llama-3-8b"), "llama-3-8b")
ROWS = [dict(scheme="bf16", ppl=10.0, kld=0.0, bytes=100), dict(scheme="w4a16-gptq", ppl=10.8, kld=0.05, bytes=30),
        dict(scheme="w8a8-sq", ppl=10.1, kld=0.01, bytes=55), dict(scheme="fp8", ppl=10.05, kld=0.008, bytes=55)]


@pytest.fixture(scope="module")
def advice():
    adv = A.advise(LLAMA3_8B, gpu="H100", batch=[1, 16, 128], accuracy_rows=ROWS, bench_dir=None,
                   accuracy_note="measured on test rows")
    adv.outliers = [{"block": b, "layers": layers, "before": {"ratio": r, "kurtosis": 20.0},
                     "after": {"ratio": r / 4, "kurtosis": 2.0}}
                    for b in range(3) for layers, r in (("q_proj,k_proj,v_proj", 9.0), ("down_proj", 31.0))]
    return adv


def test_html_is_self_contained(advice):
    page = render_html(advice)
    srcs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page, flags=re.I)
    assert len(srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, flags=re.I)
    assert "w4a16 vs w8a8" in page and "Decision" in page


def test_accuracy_panel_says_why_when_skipped():
    adv = A.advise_model("preset:llama-3-8b", gpu="A100", batch=[1], bench_dir=None)
    page = render_html(adv)
    assert "random weights" in page and page.count("data:image/png;base64,") == 3   # no outliers given


def test_markdown_table(advice):
    md = render_markdown(advice)
    assert md.startswith("# quantarena advise: llama-3-8b on H100-SXM")
    assert md.count("\n| batch ") == 3 and "## Crossover" in md


def test_write_report_atomic(tmp_path, advice):
    paths = write_report(advice, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["advice.json", "advice.txt", "report.html",
                                                                      "summary.md"]
    assert json.loads(paths["advice.json"].read_text())["crossover"]["w4a16 vs w8a8"]["batch"] > 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(tmp_path, advice):
    paths = write_report(advice, tmp_path)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--window-size=1280,4000", f"--screenshot={shot}", paths["report.html"].as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000    # a blank page is a few kB
    probe = tmp_path / "probe.html"   # a copy that records how many images decoded with a size
    probe.write_text(paths["report.html"].read_text().replace("</body>", "<script>window.onload = () => "
                     "document.body.setAttribute('data-decoded', [...document.images].filter(i => "
                     "i.naturalWidth > 300 && i.naturalHeight > 200).length)</script></body>"))
    dom = subprocess.run(cmd[:-2] + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-decoded="4"' in dom
