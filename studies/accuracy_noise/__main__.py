"""How much of the gate's retained-accuracy verdict is sampling noise: per-item zero-shot scores of a dense model
and pruned checkpoints on whole task splits, then retained accuracy on the first N items (the gate's `eval.limit`)
for several N, with a paired bootstrap over items.

    .venv/bin/python -m studies.accuracy_noise smollm2-135m /tmp/k6 /tmp/k9 --tasks piqa,arc_easy \
        --limits 200,500,all      (writes reports/accuracy_noise/accuracy_noise_smollm2-135m.json)

The first model is the dense reference. Each model is scored once on every item of each task (lm-eval, 0-shot,
the same task files `ghosted eval` uses) and its per-item scores are kept next to --out (`<out>.items/`), so a
rerun with other --limits costs nothing. Retained accuracy = pruned average / dense average of `--metric` over
the tasks, as in the gate. The bootstrap resamples items within each task, the same items for both models
(paired), and reports the 5th and 95th percentiles and the share of resamples that reach --threshold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ghosted.evaluation.zeroshot import default_cache_dir, make_lm, task_configs
from ghosted.models import load_model
from studies.common import report_dir


def item_scores(model: str, tasks: list[str], metric: str, batch_size: int) -> dict[str, list[float]]:
    """{task: [score of item 0, 1, ...]} on every item of each task's validation split."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    loaded = load_model(model)
    lm = make_lm(loaded.model, loaded.tokenizer, batch_size, progress=True)
    raw = lm_eval.simple_evaluate(
        model=lm, tasks=task_configs(tasks, default_cache_dir()), num_fewshot=0, limit=None,
        task_manager=TaskManager(include_defaults=False), log_samples=True, random_seed=0,
        numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
    )
    out = {}
    for task in tasks:
        samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
        key = metric if metric in samples[0] else "acc"  # tasks without acc_norm count with acc, as in the gate
        out[task] = [float(s[key]) for s in samples]
    return out


def cached_scores(model: str, tasks: list[str], metric: str, batch_size: int, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(f"{Path(model).resolve() if Path(model).exists() else model}|{metric}".encode()).hexdigest()
    path = folder / f"{name[:16]}.json"
    have = json.loads(path.read_text()) if path.exists() else {"model": model, "scores": {}, "seconds": {}}
    missing = [t for t in tasks if t not in have["scores"]]
    if missing:
        t0 = time.perf_counter()
        have["scores"].update(item_scores(model, missing, metric, batch_size))
        have["seconds"][",".join(missing)] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(have))
    return have


def describe(model: str) -> dict:
    """What a ghosted checkpoint is (removed layers, recovery, calibration, distillation); {} for other models."""
    cfg = Path(model) / "config.json"
    g = json.loads(cfg.read_text()).get("ghosted") if cfg.is_file() else None
    if not g:
        return {}
    return {"removed_layers": g["removed_layers"], "recovery": g["recovery"], "calibration": g["calibration"],
            "distill": g.get("distill")}


def retained(dense: dict[str, np.ndarray], pruned: dict[str, np.ndarray], idx: dict[str, np.ndarray]) -> np.ndarray:
    """Retained accuracy for each row of item indices (idx[task] has shape (B, n))."""
    d = np.mean([dense[t][idx[t]].mean(axis=1) for t in idx], axis=0)
    p = np.mean([pruned[t][idx[t]].mean(axis=1) for t in idx], axis=0)
    return p / d


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.accuracy_noise")
    ap.add_argument("models", nargs="+", help="dense model first, then pruned checkpoints")
    options = {"--tasks": {"default": "piqa,arc_easy"},
               "--metric": {"default": "acc_norm"},
               "--limits": {"default": "200,500,all", "help": "first N items per task, comma-separated"},
               "--threshold": {"type": float, "default": 0.9},
               "--boot": {"type": int, "default": 4000},
               "--batch-size": {"type": int, "default": 8},
               "--out": {"type": Path, "help": "default reports/accuracy_noise/accuracy_noise_MODEL.json"}}
    for flag, kwargs in options.items():
        ap.add_argument(flag, **kwargs)
    a = ap.parse_args()
    a.out = a.out or report_dir("accuracy_noise") / f"accuracy_noise_{Path(a.models[0]).name}.json"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in a.tasks.split(",") if t]
    folder = a.out.with_name(a.out.name + ".items")
    scores = [cached_scores(m, tasks, a.metric, a.batch_size, folder) for m in a.models]
    arrays = [{t: np.asarray(s["scores"][t]) for t in tasks} for s in scores]
    dense = arrays[0]
    rng = np.random.default_rng(0)
    rows = []
    for model, pruned in zip(a.models[1:], arrays[1:]):
        for lim in a.limits.split(","):
            n = {t: len(dense[t]) if lim == "all" else min(int(lim), len(dense[t])) for t in tasks}
            point = float(retained(dense, pruned, {t: np.arange(n[t])[None] for t in tasks})[0])
            boot = retained(dense, pruned, {t: rng.integers(0, n[t], size=(a.boot, n[t])) for t in tasks})
            rest = {t: np.arange(n[t], len(dense[t]))[None] for t in tasks}
            rows.append({
                "model": model, "plan": describe(model), "limit": lim, "items": n,
                "dense_avg": float(np.mean([dense[t][: n[t]].mean() for t in tasks])),
                "pruned_avg": float(np.mean([pruned[t][: n[t]].mean() for t in tasks])),
                "retained": point,
                "retained_p05": float(np.quantile(boot, 0.05)), "retained_p95": float(np.quantile(boot, 0.95)),
                "share_passing": float(np.mean(boot >= a.threshold)),
                "retained_other_items": (float(retained(dense, pruned, rest)[0])
                                         if all(rest[t].size for t in tasks) else None),
            })
            r = rows[-1]
            print(f"{Path(model).name:>12} first {lim:>4}: retained {r['retained']:.3f} "
                  f"[{r['retained_p05']:.3f}, {r['retained_p95']:.3f}] >= {a.threshold}: {r['share_passing']:.0%}"
                  + (f"; other items {r['retained_other_items']:.3f}" if r["retained_other_items"] else ""))
    a.out.write_text(json.dumps({"tasks": tasks, "metric": a.metric, "threshold": a.threshold, "boot": a.boot,
                                 "seconds": {s["model"]: s["seconds"] for s in scores}, "rows": rows}, indent=1)
                     + "\n")


if __name__ == "__main__":
    main()
