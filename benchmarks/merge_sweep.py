"""Merge a kernel sweep's per-model JSONs and a recheck_sweep.py run into benchmarks/results/<gpu>-kernels.json:
the recheck's rows replace every sweep row of the points it re-timed (those rows are kept under ``replaced``).
Usage: python benchmarks/merge_sweep.py OUT.json --note TEXT sweep1.json [sweep2.json ...] [--recheck recheck.json]
"""
from __future__ import annotations

import argparse
import json


def merge(sweeps: list[dict], recheck: dict | None, note: str) -> dict:
    rows = [r for s in sweeps for r in s["rows"]]
    redone = {(r["model"], r["layer"], r["M"]) for r in (recheck or {}).get("rows", [])}
    kept = [r for r in rows if (r["model"], r["layer"], r["M"]) not in redone]
    replaced = [r for r in rows if (r["model"], r["layer"], r["M"]) in redone]
    head = {k: sweeps[0][k] for k in ("device", "torch", "triton", "date", "group_size", "timing")}
    return dict(head, note=note, rows=kept + (recheck or {}).get("rows", []), replaced=replaced)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--recheck")
    ap.add_argument("--note", required=True)
    args = ap.parse_args()
    sweeps = [json.load(open(p)) for p in args.sweeps]
    recheck = json.load(open(args.recheck)) if args.recheck else None
    with open(args.out, "w") as f:
        json.dump(merge(sweeps, recheck, args.note), f, indent=1)
    print(f"wrote {args.out}")
