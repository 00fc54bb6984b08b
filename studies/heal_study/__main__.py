"""The heal study: a pruned checkpoint before and after `ghosted heal`, on the compare protocol.

Runs the product commands themselves, each once (a step whose output is already in --work is reused, with the
wall time it recorded), then writes the report:

    ghosted prune MODEL --config params.yaml --layers L --out WORK/kK --summary WORK/kK_summary.json
    ghosted heal WORK/kK --out WORK/kKh --config params.yaml                 (K: the number of layers in L)
    ghosted eval DIR --tasks none --ppl wiki,ptb --ppl-windows 16 --seq-len 512 --out WORK/<DIR>_ppl.json
    (with --tasks: ghosted eval DIR --tasks T --limit N --ppl none --out WORK/<DIR>_tasks.json)

    .venv/bin/python -m studies.heal_study smollm2-135m --layers 10-18 --work /tmp/heal
    (writes reports/heal_study/heal_study_MODEL.md, .json and heldout_curve_MODEL.png)
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ghosted.checkpoint.meta import read_meta
from ghosted.reporting.compare_report import duration, new_figure, save_figure
from studies.common import ROOT, report_dir

PPL = ["--tasks", "none", "--ppl", "wiki,ptb", "--ppl-windows", "16", "--seq-len", "512"]


def step(work: Path, name: str, argv: list[str], output: Path) -> dict:
    """Run `ghosted ARGV` unless `output` exists; its command and wall time (kept in WORK/times.json)."""
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    cmd = [str(Path(sys.executable).parent / "ghosted"), *argv]
    if not output.exists():
        print(f"[heal_study] {shlex.join(['ghosted', *argv])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        times[name] = {"command": shlex.join(["ghosted", *argv]), "seconds": time.perf_counter() - t0}
        times_path.write_text(json.dumps(times, indent=1) + "\n")
    return times.get(name, {"command": shlex.join(["ghosted", *argv]), "seconds": None})


def evaluate(work: Path, folder: Path, tasks: str | None, limit: int) -> dict:
    ppl_path = work / f"{folder.name}_ppl.json"
    out = {"ppl_run": step(work, f"eval {folder.name} ppl", ["eval", str(folder), *PPL, "--out", str(ppl_path)],
                          ppl_path)}
    out["ppl"] = {s: r["ppl"] for s, r in json.loads(ppl_path.read_text())["ppl"].items()}
    if tasks:
        zs_path = work / f"{folder.name}_tasks.json"
        argv = ["eval", str(folder), "--tasks", tasks, "--limit", str(limit), "--ppl", "none", "--out", str(zs_path)]
        out["tasks_run"] = step(work, f"eval {folder.name} tasks", argv, zs_path)
        out["average"] = json.loads(zs_path.read_text())["zeroshot"]["average"]
    return out


def count(layers: str) -> int:
    """How many layers a --layers spec names (13-18,20: 7)."""
    n = 0
    for part in layers.split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1
    return n


def plot_curve(heal: dict, path: Path) -> None:
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    steps = [0] + [c["step"] for c in heal["curve"]]
    ax.plot(steps, [heal["heldout_nll_before"]] + [c["heldout_nll"] for c in heal["curve"]], marker="o",
            label="held-out next-token loss")
    ax.axhline(heal["heldout_nll_before"], color="grey", linestyle=":", label="unhealed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"ghosted heal: {heal['data']['heldout_windows']} held-out windows of {heal['data']['seq_len']}")
    ax.legend()
    save_figure(fig, path)


def _fmt(x: float | None, f: str = ".2f") -> str:
    return "-" if x is None else format(x, f)


def markdown(doc: dict) -> str:
    h, rows = doc["heal"], doc["models"]
    tok = h["tokens"]
    lines = [f"# ghosted heal on {doc['model']} ({doc['layers']} removed)", "",
             f"`{doc['command']}`; every command below ran once on a shared 2-core CPU (their wall times include "
             "other users' load).", "",
             "| model | wiki PPL | PTB PPL | 9-task average | command wall |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        avg = r.get("average", {}).get(doc["acc_metric"]) if r.get("average") else None
        lines.append(f"| {name} | {_fmt(r['ppl'].get('wiki'))} | {_fmt(r['ppl'].get('ptb'))} | {_fmt(avg, '.4f')} "
                     f"| {duration(r['wall']) if r.get('wall') else '-'} |")
    kept = "healed" if doc["healed"] else f"kept unhealed ({h.get('reason')})"
    lines += ["", f"Healing: {kept}; held-out loss {h['heldout_nll_before']:.4f} -> {h['heldout_nll_after']:.4f} "
              f"({h['data']['heldout_windows']} held-out windows of {h['data']['seq_len']} tokens from "
              f"`{h['data']['source']}`), {h['steps_run']} steps (stopped: {h['stopped']}), "
              f"{tok['train']:,} training tokens ({tok['teacher']:,} distinct, teacher top-{h['recipe']['top_k']}), "
              f"wall {duration(h['seconds']['total'])} (data {duration(h['seconds']['data'])}, teacher "
              f"{duration(h['seconds']['teacher'])}, training {duration(h['seconds']['train'])}).", "",
             f"Trained: layers {h['plan']['adjacent']} in full ({h['trained_params']['adjacent']:,} parameters), LoRA "
             f"rank {h['plan']['lora_rank']} on layers {h['plan']['lora']} ({h['trained_params']['lora']:,}), "
             f"ghosts {h['trained_params']['ghosts']:,}.", "",
             "Overlap with the evaluation texts (the whole text, cut like the healing windows): "
             + "; ".join(f"{s}: {o['windows']} windows, {o['shared_spans']} shared 32-token spans in "
                         f"{o['windows_sharing']} healing windows" for s, o in h["data"]["eval_overlap"].items()),
             "", "| step | training KL | held-out loss |", "|---|---|---|", f"| 0 | - | {h['heldout_nll_before']:.4f} |"]
    lines += [f"| {c['step']} | {c['train_kl']:.4f} | {c['heldout_nll']:.4f} |" for c in h["curve"]]
    lines += ["", f"![held-out loss against steps](heldout_curve_{doc['model']}.png)", "", "Commands:", ""]
    lines += [f"- `{c['command']}` ({duration(c['seconds']) if c['seconds'] else 'time not recorded'})"
              for c in doc["commands"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.heal_study")
    ap.add_argument("model")
    ap.add_argument("--layers", default="10-18")
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/heal"), help="where the checkpoints and results go")
    ap.add_argument("--tasks", help="also the zero-shot average over these tasks, e.g. piqa,hellaswag,...")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--heal-args", default="", help="more `ghosted heal` flags, e.g. \"--max-minutes 240\" on a "
                                                     "loaded machine (the recipe is --config's heal: section)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    tag = f"k{count(a.layers)}"  # 10-18: WORK/k9 and WORK/k9h
    pruned, healed = a.work / tag, a.work / f"{tag}h"
    summary = a.work / f"{tag}_summary.json"
    runs = [step(a.work, "prune", ["prune", a.model, "--config", a.config, "--layers", a.layers, "--out", str(pruned),
                                   "--summary", str(summary)], pruned),
            step(a.work, "heal", ["heal", str(pruned), "--out", str(healed), "--config", a.config,
                                  *shlex.split(a.heal_args)], healed)]
    meta = read_meta(healed)
    # the commands' own records of their wall time (a step run before this study recorded no time of its own)
    runs[0]["seconds"] = runs[0]["seconds"] or json.loads(summary.read_text())["seconds"]
    runs[1]["seconds"] = runs[1]["seconds"] or meta.heal["seconds"]["total"]
    models = {}
    for label, folder, run in (("pruned, training-free", pruned, runs[0]), ("healed", healed, runs[1])):
        r = evaluate(a.work, folder, a.tasks, a.limit)
        runs += [r["ppl_run"]] + ([r["tasks_run"]] if "tasks_run" in r else [])
        models[label] = {**r, "wall": run["seconds"]}
    out = report_dir("heal_study")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": a.model, "layers": a.layers, "healed": bool(meta.healed), "heal": meta.heal, "models": models,
           "commands": runs, "acc_metric": "acc_norm",
           "command": shlex.join(["python", "-m", "studies.heal_study", *sys.argv[1:]])}
    plot_curve(meta.heal, out / f"heldout_curve_{a.model}.png")
    (out / f"heal_study_{a.model}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / f"heal_study_{a.model}.md").write_text(markdown(doc))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
