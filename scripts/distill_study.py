"""Training-free ghost vs distilled ghost on a shipped model (wiki/PTB perplexity, compare protocol).

    .venv/bin/python scripts/distill_study.py smollm2-135m --ks 6,9 --steps 200 --out reports/distill_smollm2-135m.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ghosted.config import PruneConfig
from ghosted.data import build_calibration
from ghosted.distill import DistillConfig, distill
from ghosted.evaluate.perplexity import perplexity
from ghosted.models import load_model
from ghosted.prune import heldout_windows, solve
from ghosted.surgery import temporarily_pruned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ks", default="6,9")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    loaded = load_model(a.model)
    calib = build_calibration(loaded.tokenizer, "passages", 32, 512, 0)
    rows = []
    for k in [int(x) for x in a.ks.split(",")]:
        cfg = PruneConfig(remove=k)
        t0 = time.perf_counter()
        sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
        t_free = time.perf_counter() - t0
        res = distill(loaded.model, calib.input_ids, sol.removed, sol.operators, heldout_windows(calib.n, cfg.holdout),
                      DistillConfig(steps=a.steps, lr=a.lr), progress=True)
        row = {"k": k, "removed": sol.removed, "guard": sol.meta.get("guard"), "seconds_training_free": t_free,
               "distill": res.as_meta()}
        for name, ops in (("training_free", sol.operators), ("distilled", res.operators)):
            with temporarily_pruned(loaded.model, sol.removed, ops) as m:
                row[name] = {s: perplexity(m, loaded.tokenizer, s, 512, a.ppl_windows, progress=False)["ppl"]
                             for s in ("wiki", "ptb")}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    lines = [f"# Ghost distillation on {a.model}", "",
             f"`.venv/bin/python scripts/distill_study.py {a.model} --ks {a.ks} --steps {a.steps} --lr {a.lr}`: "
             f"32 x 512 calibration passages (8 held out), angular selection, wiki/PTB perplexity on {a.ppl_windows} "
             "x 512 windows.", "",
             "| k | training-free wiki / PTB | distilled wiki / PTB | kept | steps | fit s | distill s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["distill"]
        lines.append(f"| {r['k']} | {r['training_free']['wiki']:.2f} / {r['training_free']['ptb']:.2f} | "
                     f"{r['distilled']['wiki']:.2f} / {r['distilled']['ptb']:.2f} | {d['kept']} | {d['steps_run']} | "
                     f"{r['seconds_training_free']:.0f} | {d['seconds']:.0f} |")
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
