"""--recovery foldable on a shipped model: every fold candidate, the guard's pick, and the saved plain checkpoint.

Compare protocol: one shared calibration capture (32 x 512 passages, seed 0), angular selection, wiki and PTB
perplexity on the first 16 windows of 512 tokens. For each k: plain removal; each fold (cq, replaceme,
cq+replaceme) with the fit policy the held-out guard scored best for it; the guard's own pick (auto); and that
pick built into a checkpoint, reloaded with plain `AutoModelForCausalLM.from_pretrained` (no custom code) and
evaluated again, with its logits compared to the hooked form in memory. Writes reports/foldable_study/foldable_<model>.json/.md.

    .venv/bin/python -m studies.foldable_study smollm2-135m --ks 6,9
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ghosted.corpora import build_calibration
from ghosted.evaluation.perplexity import perplexity
from ghosted.io import write_json_atomic, write_text_atomic
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import load_model
from ghosted.solve.solver import PruneConfig, build_checkpoint, shared_capture, solve
from studies.common import report_dir

SOURCES = ("wiki", "ptb")


def ppl(model, tok, windows: int) -> dict[str, float]:
    return {src: perplexity(model, tok, src, 512, windows, progress=False)["ppl"] for src in SOURCES}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def checkpoint_row(args, calib, sol, hooked_logits: torch.Tensor, probe: torch.Tensor) -> dict:
    """Build the solution into a fresh copy of the model, save, reload plainly, evaluate."""
    loaded = load_model(args.model)
    with tempfile.TemporaryDirectory(prefix="foldable-") as tmp:
        out = Path(tmp) / "ck"
        meta = build_checkpoint(loaded, sol, calib.sha256, out)
        cfg = json.loads((out / "config.json").read_text())
        files = sorted(p.name for p in out.iterdir())
        plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
        diff_memory = float((logits(loaded.model, probe) - hooked_logits).abs().max())
        diff_plain = float((logits(plain, probe) - hooked_logits).abs().max())
        scores = ppl(plain, loaded.tokenizer, args.ppl_windows)
    return {"architectures": cfg.get("architectures"), "model_type": cfg.get("model_type"),
            "auto_map": "auto_map" in cfg, "tie_word_embeddings": cfg.get("tie_word_embeddings"),
            "num_layers": meta.num_layers, "ghosts": meta.ghosts, "folded": meta.folded,
            "guard_chosen": cfg["ghosted"]["guard"].get("chosen"), "files": files,
            "max_abs_logit_diff_folded_vs_hooked": diff_memory, "max_abs_logit_diff_plain_reload_vs_hooked": diff_plain,
            **scores}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m studies.foldable_study")
    p.add_argument("model")
    p.add_argument("--ks", default="6,9")
    p.add_argument("--n-seqs", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--out", type=Path, default=report_dir("foldable_study"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    calib = build_calibration(tok, "passages", args.n_seqs, args.seq_len, 0)
    template = PruneConfig(remove=ks[0], recovery="foldable")
    res = shared_capture(loaded, calib, template, ks, ["none", "foldable"], progress=False, log=print)
    probe = calib.input_ids[-2:, :128]
    rows = [{"k": 0, "variant": "dense", **ppl(model, tok, args.ppl_windows)}]
    print(rows[-1], flush=True)
    checkpoints = {}
    quiet = lambda m: None  # noqa: E731

    def run(k: int, variant: str, cfg: PruneConfig):
        sol = solve(loaded, calib, cfg, progress=False, log=quiet, shared=res)
        with temporarily_pruned(model, sol.removed, sol.operators) as m:
            row = {"k": k, "variant": variant, "removed": sol.removed, "token_policy": sol.meta.token_policy,
                   "solve_seconds": sol.meta.solve_seconds,
                   "info": [op.info for op in sol.operators.values()],
                   "guard_chosen": sol.meta.guard.to_dict().get("chosen", "off"),
                   "scale": [op.scale for op in sol.operators.values() if op.scale is not None],
                   "calibration_relative_residual": sol.meta.calibration_relative_residual,
                   **ppl(m, tok, args.ppl_windows)}
        rows.append(row)
        print({k_: v for k_, v in row.items() if k_ != "guard_scores"}, flush=True)
        return sol

    name = args.model.replace("/", "_")

    def save() -> None:  # after every row, so an interrupted run still leaves its numbers
        doc = {"rows": rows, "checkpoints": {str(k): v for k, v in checkpoints.items()},
               "seconds": time.perf_counter() - t0, "calibration_sha256": calib.sha256,
               "args": vars(args) | {"out": str(args.out)}}
        write_json_atomic(args.out / f"foldable_{name}.json", doc)
        write_text_atomic(args.out / f"foldable_{name}.md", render(doc, args.model))

    autos = {}
    for k in ks:  # the headline first: removal and the guard's pick
        run(k, "none", PruneConfig(remove=k, recovery="none"))
        autos[k] = run(k, "foldable (guard: auto)", PruneConfig(remove=k, recovery="foldable"))
        rows[-1]["guard_scores"] = autos[k].meta.guard.scores
        save()
    for k in ks:  # the pick as a saved plain checkpoint
        auto = autos[k]
        with temporarily_pruned(model, auto.removed, auto.operators) as m:
            hooked = logits(m, probe)
        checkpoints[k] = checkpoint_row(args, calib, auto, hooked, probe)
        print({"k": k, "checkpoint": checkpoints[k]}, flush=True)
        save()
    for k in ks:  # each fold alone, at the fit policy the guard scored best for it
        scores = autos[k].meta.guard.scores
        for fold in ("cq", "replaceme", "cq+replaceme"):
            mine = {key: v for key, v in scores.items() if key.split("/")[0] == fold}
            if not mine:
                continue
            policy = min(mine, key=mine.get).split("/")[1]
            run(k, f"{fold} ({policy}, no guard)",
                PruneConfig(remove=k, recovery="foldable", fold=fold, token_policy=policy, guard="off"))
            save()
    print(f"wrote {args.out}/foldable_{name}.md in {time.perf_counter() - t0:.0f} s")


def render(doc: dict, model: str) -> str:
    a = doc["args"]
    lines = [f"# --recovery foldable on {model}", "",
             f"Generated by `python -m studies.foldable_study {model} --ks {a['ks']}` (not hand-edited). Calibration "
             f"{a['n_seqs']} x {a['seq_len']} passages (sha256 {doc['calibration_sha256'][:12]}), angular selection, "
             f"held-out guard on the last 25% of the calibration windows; perplexity on the first {a['ppl_windows']} "
             "windows of 512 tokens. Rows other than the checkpoint are evaluated in memory with the hooked form "
             "(c Q as a ghost, T folded); the checkpoint row is the saved folder reloaded with plain "
             "`AutoModelForCausalLM.from_pretrained` (no custom code).", "",
             "| k | layers | variant | policy | c | calib. rel. residual | wiki PPL | PTB PPL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        removed = r.get("removed", [])
        layers = f"{removed[0]}-{removed[-1]}" if removed else "-"
        res = ", ".join(f"{v:.3f}" for v in r.get("calibration_relative_residual", {}).values()) or "-"
        scale = ", ".join(f"{c:.3f}" for c in r.get("scale", [])) or "-"
        lines.append(f"| {r['k']} | {layers} | {r['variant']} | {r.get('token_policy', '-')} | {scale} | {res} | "
                     f"{r['wiki']:.2f} | {r['ptb']:.2f} |")
    for k, c in doc["checkpoints"].items():
        lines.append(f"| {k} | | checkpoint ({c['guard_chosen']}), plain reload | | | | {c['wiki']:.2f} | "
                     f"{c['ptb']:.2f} |")
    lines += ["", "## Held-out guard (next-token loss on held-out calibration windows; lower is better)", ""]
    for r in doc["rows"]:
        if "guard_scores" in r:
            s = r["guard_scores"]
            lines.append(f"k={r['k']}: chosen **{r['guard_chosen']}**; " +
                         ", ".join(f"{key} {v:.4f}" for key, v in sorted(s.items(), key=lambda kv: kv[1])))
            lines.append("")
    lines += ["## Saved checkpoints", ""]
    for k, c in doc["checkpoints"].items():
        lines.append(f"- k={k}: architectures {c['architectures']}, model_type {c['model_type']}, auto_map "
                     f"{c['auto_map']}, tie_word_embeddings {c['tie_word_embeddings']}, "
                     f"ghost modules {len(c['ghosts'])}, "
                     f"{c['num_layers']} layers, files {', '.join(c['files'])}; max |logit| difference to the hooked "
                     f"form: folded in memory {c['max_abs_logit_diff_folded_vs_hooked']:.2e}, plain reload "
                     f"{c['max_abs_logit_diff_plain_reload_vs_hooked']:.2e}; folded: {'; '.join(c['folded']) or '-'}")
    lines += ["", f"Total time {doc['seconds']:.0f} s (CPU).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
