"""Compact summary of kernel JSON files: ours vs each peer per (shape, M), as speed-up over bf16."""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    rows = [r for p in paths for r in json.load(open(p))["rows"]]
    t = defaultdict(dict)
    for r in rows:
        if "us" in r:
            t[(r["model"], r["layer"], r["M"])][f"{r['op']}/{r['impl']}"] = r
    cols = ["w4a16/quantarena", "w4a16/tinygemm", "w4a16/gemlite", "w8a8/quantarena", "w8a8/int_mm",
            "w8a8/gemlite", "fp8/quantarena", "fp8/scaled_mm", "fp8/gemlite"]
    print("speed-up over bf16 (bf16 us); " + " | ".join(c.replace("quantarena", "ours") for c in cols))
    for key in sorted(t, key=lambda k: (k[0], k[1], k[2])):
        d = t[key]
        if "bf16/cublas" not in d:
            continue
        b = d["bf16/cublas"]["us"]
        cells = [f"{b / d[c]['us']:.2f}" if c in d else "-" for c in cols]
        q = d.get("w4a16/quantarena", {})
        print(f"{key[0][-3:]} {key[1]:8} M={key[2]:<5} bf16={b:8.1f} " + " ".join(f"{c:>5}" for c in cells)
              + f" w4:{q.get('path', '')} {q.get('tb_s', '')}TB/s")
    worst: dict[str, float] = {}
    for r in rows:
        if "rel_err" in r:
            worst[r["op"]] = max(worst.get(r["op"], 0.0), r["rel_err"])
    print("max rel_err per op (NaN = unwritten output):", worst)
    print("errors:", [(r["op"], r["impl"], r["M"], r["error"][:60]) for r in rows if "error" in r][:12])


if __name__ == "__main__":
    main(sys.argv[1:])
