"""Training-free ghost vs distilled ghost on a shipped model (wiki/PTB perplexity, compare protocol).

Each k: the training-free solve (angular selection, the held-out guard), then distillation at each learning rate
of --lrs, started as `--distill` starts it (from the operators fitted without the held-out windows, which it
is then compared with on those windows); wiki and PTB perplexity of the shipped training-free operators and of
what the distillation guard keeps.

    .venv/bin/python -m studies.distill_study smollm2-135m --ks 6 --steps 200 --lrs 2e-5
    (writes reports/distill_study/distill_study_smollm2-135m.md and .json)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from ghosted.config import PruneConfig
from ghosted.corpora import build_calibration
from ghosted.evaluation.perplexity import perplexity
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import load_model
from ghosted.solve.solver import distill_operators, solve
from studies.common import report_dir


def ppl(loaded, removed, ops, windows: int) -> dict[str, float]:
    with temporarily_pruned(loaded.model, removed, ops) as m:
        return {s: perplexity(m, loaded.tokenizer, s, 512, windows, progress=False)["ppl"] for s in ("wiki", "ptb")}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.distill_study")
    ap.add_argument("model")
    ap.add_argument("--ks", default="6,9")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lrs", default="2e-5", help="comma-separated learning rates")
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, help="the .md report, a .json beside it "
                    "(default reports/distill_study/distill_study_MODEL.md)")
    a = ap.parse_args()
    a.out = a.out or report_dir("distill_study") / f"distill_study_{Path(a.model).name}.md"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(a.model)
    calib = build_calibration(loaded.tokenizer, "passages", 32, 512, 0)
    rows = []
    lrs = [float(x) for x in a.lrs.split(",")]
    for k in [int(x) for x in a.ks.split(",")]:
        cfg = PruneConfig(remove=k)
        t0 = time.perf_counter()
        sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None, keep_fit_operators=True)
        t_free = time.perf_counter() - t0
        row = {"k": k, "removed": sol.removed, "guard": sol.meta.guard.to_dict(), "seconds_training_free": t_free,
               "training_free": ppl(loaded, sol.removed, sol.operators, a.ppl_windows), "distilled": []}
        for lr in lrs:
            ops, info = distill_operators(loaded, calib, replace(cfg, distill=a.steps, distill_lr=lr), sol.removed,
                                          sol.operators, fit_operators=sol.fit_operators)  # what --distill ships
            row["distilled"].append({**info, "ppl": ppl(loaded, sol.removed, ops, a.ppl_windows)})
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    lines = [f"# Ghost distillation on {a.model}", "",
             f"`.venv/bin/python -m studies.distill_study {a.model} --ks {a.ks} --steps {a.steps} --lrs {a.lrs}`: "
             f"32 x 512 calibration passages (8 held out), angular selection, wiki/PTB perplexity on {a.ppl_windows} "
             "x 512 windows. Held-out loss: next-token loss on the 8 held-out windows, training-free = the operator "
             "fitted without them; kept = what the distillation guard ships (training-free: the every-window fit).", "",
             "| k | lr | training-free wiki / PTB | kept wiki / PTB | held-out loss before -> best | kept | steps | "
             "fit s | distill s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for d in r["distilled"]:
            lines.append(f"| {r['k']} | {d['lr']:g} | {r['training_free']['wiki']:.2f} / {r['training_free']['ptb']:.2f} "
                         f"| {d['ppl']['wiki']:.2f} / {d['ppl']['ptb']:.2f} | {d['heldout_nll_training_free']:.4f} -> "
                         f"{d['heldout_nll_distilled']:.4f} | {d['kept']} | {d['steps_run']} | "
                         f"{r['seconds_training_free']:.0f} | {d['seconds']:.0f} |")
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
