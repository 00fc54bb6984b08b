"""The robust-ghost study: none vs the paper's ghost vs ghosted's defaults, at several cut sizes.

One shared calibration capture (token policy auto keeps sink tokens' sums apart, so every fit
policy is served), then for each k: plain removal and the paper's ghost (all tokens, ridge 1e-6,
no guard) on the angular block, ghosted's default (auto policy + held-out guard) on the angular
block, and the same with ghost-aware selection. Each variant is evaluated in memory: perplexity on
wiki and PTB and a few zero-shot tasks. Writes reports/robust_<model>.json and .md.

    .venv/bin/python scripts/robust_study.py smollm2-135m --ks 3,6,9,12
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ghosted import arch
from ghosted.capture import capture
from ghosted.data import build_calibration
from ghosted.evaluate.perplexity import perplexity
from ghosted.evaluate.zeroshot import evaluate_zeroshot
from ghosted.io import write_json_atomic, write_text_atomic
from ghosted.models import load_model
from ghosted.prune import PruneConfig, _bos, heldout_windows, shared_plan, solve
from ghosted.surgery import temporarily_pruned

VARIANTS = {
    "none": dict(recovery="none", guard="off"),
    "paper ghost": dict(recovery="ghost", token_policy="all", ridge=1e-6, guard="off"),
    "robust ghost (angular)": dict(recovery="ghost"),
    "robust ghost (ghost-aware)": dict(recovery="ghost", select="ghost"),
}


def evaluate(model, tok, args) -> dict:
    out = {src: perplexity(model, tok, src, 512, args.ppl_windows, progress=False)["ppl"] for src in ("wiki", "ptb")}
    if args.tasks:
        zs = evaluate_zeroshot(model, tok, args.tasks.split(","), args.limit, progress=False)
        for t, m in zs["tasks"].items():
            out[t] = m["acc_norm"] if m.get("acc_norm") is not None else m["acc"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--ks", default="3,6,9,12")
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--tasks", default="piqa,arc_easy,winogrande")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args()
    t0 = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    calib = build_calibration(tok, "passages", args.n_seqs, args.seq_len, 0)
    L = arch.num_layers(model)
    held = heldout_windows(calib.n, 0.25)
    plan = shared_plan(L, model.config.hidden_size, ks, ["ghost"], held)
    res = capture(model, calib.input_ids, plan, "auto", bos_id=_bos(tok), desc="shared capture")
    rows = [{"k": 0, "variant": "dense", "removed": [], **evaluate(model, tok, args)}]
    print(rows[-1], flush=True)
    for k in ks:
        for name, kw in VARIANTS.items():
            sol = solve(loaded, calib, PruneConfig(remove=k, **kw), progress=False, log=lambda m: None, shared=res)
            with temporarily_pruned(model, sol.removed, sol.operators) as m:
                row = {"k": k, "variant": name, "removed": sol.removed, "token_policy": sol.meta["token_policy"],
                       "ridge": sol.meta["ridge"], "guard": sol.meta["guard"].get("chosen", "off"),
                       **evaluate(m, tok, args)}
            rows.append(row)
            print({k2: v for k2, v in row.items() if k2 != "guard"} | {"guard": row["guard"]}, flush=True)
    seconds = time.perf_counter() - t0
    name = args.model.replace("/", "_")
    write_json_atomic(args.out / f"robust_{name}.json", {"rows": rows, "seconds": seconds, "args": vars(args) | {"out": str(args.out)}})
    tasks = args.tasks.split(",") if args.tasks else []
    lines = [f"# Robust ghost study: {args.model} ({L} layers)", "",
             f"Calibration {args.n_seqs} x {args.seq_len} `passages`, 25% held out for the guard; perplexity on "
             f"{args.ppl_windows} windows x 512 of wiki (BoolQ passages) and PTB test; zero-shot {', '.join(tasks)} "
             f"(lm-eval, acc_norm where defined, first {args.limit} validation items). Wall time {seconds / 60:.1f} min.", "",
             "| k | variant | removed | policy / ridge (guard choice) | wiki PPL | PTB PPL | " + " | ".join(tasks) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in sorted(rows, key=lambda r: r["k"]):
        rem = f"{r['removed'][0]}-{r['removed'][-1]}" if r["removed"] else "-"
        pol = f"{r.get('token_policy', '-')} / {r.get('ridge', '-')} ({r.get('guard', '-')})" if r["k"] else "-"
        lines.append(f"| {r['k']} | {r['variant']} | {rem} | {pol} | {r['wiki']:.2f} | {r['ptb']:.2f} | "
                     + " | ".join(f"{r[t]:.3f}" for t in tasks) + " |")
    lines += ["", f"Command: `.venv/bin/python scripts/robust_study.py {args.model} --ks {args.ks} --n-seqs {args.n_seqs} "
                  f"--ppl-windows {args.ppl_windows} --tasks {args.tasks} --limit {args.limit}`"]
    write_text_atomic(args.out / f"robust_{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(math.isfinite(r["wiki"]) for r in rows)


if __name__ == "__main__":
    main()
