"""The robust-ghost study: none vs the paper's ghost vs ghosted's defaults, at several cut sizes.

One shared calibration capture (token policy auto keeps sink tokens' sums apart, so every fit
policy is served), then for each k: plain removal and the paper's ghost (all tokens, ridge 1e-6,
no guard) on the angular block, ghosted's default (auto policy + held-out guard) on the angular
block, and the same with ghost-aware selection. Each variant is a grid cell (ghosted/grid.py),
evaluated in memory: perplexity on wiki and PTB and a few zero-shot tasks. Writes
reports/robust_study/robust_<model>.json, .md and plots (ghosted/reporting/compare_report.py).

    .venv/bin/python -m studies.robust_study smollm2-135m --ks 3,6,9,12
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

from ghosted.config import EvalSettings
from ghosted.corpora import build_calibration
from ghosted.evaluation.run import versions
from ghosted.models import load_model
from ghosted.reporting.compare_report import write_report
from ghosted.solve.grid import grid_header, run_cell, run_dense
from ghosted.solve.solver import PruneConfig, shared_capture
from studies.common import report_dir

VARIANTS = {
    "none": dict(recovery="none", guard="off"),
    "paper ghost": dict(recovery="ghost", token_policy="all", ridge=1e-6, guard="off"),
    "robust ghost (angular)": dict(recovery="ghost"),
    "robust ghost (ghost-aware)": dict(recovery="ghost", select="ghost"),
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m studies.robust_study")
    p.add_argument("model")
    p.add_argument("--ks", default="3,6,9,12")
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--out", type=Path, default=report_dir("robust_study"))
    args = p.parse_args()
    t0 = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    loaded = load_model(args.model)
    calib = build_calibration(loaded.tokenizer, "passages", args.n_seqs, args.seq_len, 0)
    # perplexity windows stay 512 tokens whatever the calibration length (the study's protocol)
    evaluation = EvalSettings(tasks=args.tasks or "none", ppl="wiki,ptb", limit=args.limit,
                              ppl_windows=args.ppl_windows, seq_len=512)
    template = PruneConfig(remove=ks[0])  # ghosted's defaults: token policy auto, held-out guard
    shared = shared_capture(loaded, calib, template, ks, ["ghost"], progress=False)
    header = grid_header(loaded, calib, template, ks, list(VARIANTS), evaluation, shared, time.perf_counter() - t0)
    dense = run_dense(loaded.model, loaded.tokenizer, evaluation)
    print(dense.as_dict(), flush=True)
    cells = []
    for k in ks:
        for name, kw in VARIANTS.items():
            cell = run_cell(loaded, calib, shared, PruneConfig(remove=k, **kw), evaluation,
                            dense_average=dense.average)
            cells.append({**cell.as_dict(), "method": name})  # the variant's name, where the report shows a method
            print({key: cells[-1].get(key) for key in ("k", "method", "removed", "token_policy", "ridge", "error")},
                  flush=True)
    seconds = time.perf_counter() - t0
    result = {**header, "kind": "robust", "title": "Robust ghost study", "dense": dense.as_dict(), "cells": cells, "versions": versions(),
              "seconds": seconds, "command": shlex.join([".venv/bin/python", "-m", "studies.robust_study", *sys.argv[1:]])}
    name = f"robust_{args.model.replace('/', '_')}"
    for path in write_report(result, args.out, name=name, plot_prefix=f"{name}_"):
        print(path)
    assert all(math.isfinite(c["ppl"]["wiki"]["ppl"]) for c in [result["dense"], *cells] if not c.get("error"))


if __name__ == "__main__":
    main()
