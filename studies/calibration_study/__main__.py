"""What the calibration text does to the training-free ghost: wiki/PTB perplexity (and optionally zero-shot
accuracy) of fixed layer plans, fitted on each calibration of --calib (SOURCE:NxT, SOURCE may be a mixture A+B).

    .venv/bin/python -m studies.calibration_study smollm2-135m --layers 10-18,13-18 \
        --calib passages:32x512,passages+ptb-train:32x512,passages+ptb-train:64x512
        (writes reports/calibration_study/calibration_study_smollm2-135m.json)

One row per (layers, calibration): the plan solved by prune.solve with the default guard (token policy and ridge
chosen on the held-out windows), then perplexity on --ppl-windows x 512 tokens of `wiki` and `ptb` (the compare
protocol uses 16) and, with --tasks, lm-eval zero-shot acc_norm on the first --limit items of each task.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghosted.config import PruneConfig
from ghosted.corpora import build_calibration
from ghosted.evaluation.perplexity import perplexity
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import load_model
from ghosted.solve.solver import solve
from studies.common import report_dir


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.calibration_study")
    ap.add_argument("model")
    options = {"--layers": {"required": True, "help": "plans, comma-separated: 10-18,13-18"},
               "--calib": {"required": True, "help": "calibrations, comma-separated SOURCE:NxT"},
               "--ppl-windows": {"type": int, "default": 16},
               "--tasks": {"default": "", "help": "zero-shot tasks, e.g. piqa,arc_easy (default: none)"},
               "--limit": {"type": int, "default": 200},
               "--out": {"type": Path, "help": "default reports/calibration_study/calibration_study_MODEL.json"}}
    for flag, kwargs in options.items():
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args()
    a.out = a.out or report_dir("calibration_study") / f"calibration_study_{Path(a.model).name}.json"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(a.model)
    tok = loaded.tokenizer
    rows = []
    for layers in a.layers.split(","):
        for spec in a.calib.split(","):
            source, size = spec.rsplit(":", 1)
            n, seq_len = (int(x) for x in size.split("x"))
            calib = build_calibration(tok, source, n, seq_len, 0)
            t0 = time.perf_counter()
            sol = solve(loaded, calib, PruneConfig(layers=layers), progress=False, log=lambda m: None)
            guard = sol.meta.guard.to_dict()
            row = {"layers": layers, "calibration": spec, "sha256": calib.sha256[:12],
                   "chosen": guard.get("chosen") if isinstance(guard, dict) else None}
            with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
                for s in ("wiki", "ptb"):
                    row[s] = perplexity(m, tok, s, 512, a.ppl_windows, progress=False)["ppl"]
                if a.tasks:
                    from ghosted.evaluation.zeroshot import evaluate_zeroshot

                    z = evaluate_zeroshot(m, tok, a.tasks.split(","), a.limit, progress=False)
                    row["acc_norm"] = z["average"]["acc_norm"]
                    row["tasks"] = {t: v.get("acc_norm") for t, v in z["tasks"].items()}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    a.out.write_text(json.dumps({"command": "python -m studies.calibration_study " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "model"), "model": a.model,
        "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
