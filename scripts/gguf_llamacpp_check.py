"""llama.cpp itself reads `ghosted export --gguf`: perplexity of the GGUF in llama.cpp vs the folder in ghosted.

Needs the optional extra (`pip install -e ".[gguf]"`, llama-cpp-python builds llama.cpp from source):

    .venv/bin/python scripts/gguf_llamacpp_check.py                       # prune smollm2-135m 13-18, scalar
    .venv/bin/python scripts/gguf_llamacpp_check.py --ckpt out/smol-plain  # an existing checkpoint
    .venv/bin/python scripts/gguf_llamacpp_check.py --ckpt out/smol-k9 --out reports/gguf_llamacpp/deci_k9.md
                                                    # an exportable ghost: written as llama.cpp's deci architecture

Steps, each the real command: `ghosted prune` (unless --ckpt), `ghosted eval CKPT --ppl wiki` (the folder's
perplexity), `ghosted export CKPT --gguf` per --outtype, then llama.cpp (llama-cpp-python, logits of every
position) on exactly the token windows ghosted's perplexity uses (ghosted/data.py: 512-token windows, BOS first
when the tokenizer adds one; every next-token prediction in a window scored). Then greedy generation (32 tokens
from 10 prompts, llama.cpp f32 vs the folder through `ghosted.load`) and llama.cpp's speed, prefill and decode,
of the pruned GGUF against the dense base's GGUF (same outtype, --threads). Writes --out (reports/).
Exit code 1 when the f32 GGUF is not within --tolerance (1%) of the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _ghosted(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ghosted.cli", *argv], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"ghosted {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def llamacpp_nll(gguf_path: Path, windows: np.ndarray, threads: int) -> tuple[float, int]:
    """Mean next-token NLL of llama.cpp over windows [N, T] (float64 log-softmax of llama.cpp's logits)."""
    from llama_cpp import Llama

    n_ctx = int(windows.shape[1])
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    total, count = 0.0, 0
    for row in windows:
        llm.reset()  # empty KV cache: every window is scored on its own, like a fresh forward pass
        llm.eval(row.tolist())
        logits = np.asarray(llm.scores[: n_ctx - 1], dtype=np.float64)  # [T-1, V]: predictions for tokens 1..T-1
        m = logits.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        total += float((logz - logits[np.arange(n_ctx - 1), row[1:]]).sum())
        count += n_ctx - 1
    del llm
    return total / count, count


PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "The recipe for a simple bread needs",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village,",
    "The main difference between a virus and a bacterium is",
    "To install a Python package, you",
    "The stock market fell sharply on Monday after",
    "Water boils at a lower temperature at high altitude because",
    "The first step in training a neural network is",
)


def greedy_check(ckpt: Path, gguf_path: Path, threads: int, new_tokens: int = 32) -> tuple[int, list[str]]:
    """How many prompts give the same greedy continuation (token ids) in llama.cpp and in the folder."""
    import torch
    from llama_cpp import Llama

    import ghosted
    from ghosted.models import load_tokenizer

    model = ghosted.load(str(ckpt))
    tok, _ = load_tokenizer(str(ckpt))
    llm = Llama(model_path=str(gguf_path), n_ctx=128, n_batch=128, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    same, diffs = 0, []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
        want = ref[0, ids.shape[1]:].tolist()
        llm.reset()
        got = []
        for t in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
            got.append(int(t))
            if len(got) == new_tokens or t == tok.eos_token_id:
                break
        if got == want:
            same += 1
        else:
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            diffs.append(f"{prompt!r}: first difference at token {k}")
    del llm
    return same, diffs


def speed(gguf_path: Path, threads: int, prefill: int = 256, decode: int = 64, repeats: int = 3) -> dict:
    """llama.cpp tokens/s: one prompt of `prefill` tokens, then `decode` single-token steps (best of `repeats`)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=prefill + decode + 8, n_batch=prefill, n_ubatch=prefill,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = [100 + (i * 37) % 5000 for i in range(prefill + decode)]
    best_p = best_d = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:prefill])
        t1 = time.perf_counter()
        for t in ids[prefill:]:
            llm.eval([t])
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    del llm
    return {"prefill_tps": prefill / best_p, "decode_tps": decode / best_d}


def tokenizer_agreement(gguf_path: Path, tok, docs: list[str], n_docs: int) -> tuple[int, int]:
    """How many of the first documents llama.cpp's own tokenizer splits exactly like the folder's tokenizer."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    same = sum(llm.tokenize(d.encode(), add_bos=False, special=False) == tok(d, add_special_tokens=False).input_ids
               for d in docs[:n_docs])
    return same, min(n_docs, len(docs))


# Tiny random models: every exported family, incl. a Gemma 3 layer pattern that pruning leaves irregular.
TINY_CASES = (
    ("llama", None),
    ("gemma3_text", None),
    ("gemma3_text", ["sliding_attention", "full_attention", "full_attention", "sliding_attention",
                     "sliding_attention", "full_attention"]),
)


def tiny_logits_check(tmp: Path, threads: int) -> list[dict]:
    """Logits of llama.cpp vs transformers on the same 40 tokens, per tiny family (f32 export)."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from ghosted.checkpoint.gguf import export_gguf
    from tests.checkpoint.test_export import make_tiny_folder

    rows = []
    for i, (family, types) in enumerate(TINY_CASES):
        folder = make_tiny_folder(tmp / f"tiny{i}", family, num_layers=6)
        if types:
            cfg = json.loads((folder / "config.json").read_text())
            cfg["layer_types"] = types
            (folder / "config.json").write_text(json.dumps(cfg))
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        path = export_gguf(folder, tmp / f"tiny{i}.gguf", "f32").path
        ids = torch.randint(3, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model(ids[None]).logits[0].double().numpy()
        llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=threads, verbose=False)
        llm.eval(ids.tolist())
        got = np.asarray(llm.scores[:40], dtype=np.float64)
        del llm
        rows.append({"family": family, "layer_types": getattr(model.config, "layer_types", None),
                     "max_diff": float(np.abs(got - ref).max()), "max_logit": float(np.abs(ref).max()),
                     "argmax_equal": float((got.argmax(1) == ref.argmax(1)).mean())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="13-18")
    ap.add_argument("--recovery", default="scalar", help="a plain recovery: none, scalar, replaceme, foldable")
    ap.add_argument("--n-seqs", type=int, default=8, help="calibration windows for the prune")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--ckpt", type=Path, help="an existing plain checkpoint (skips the prune)")
    ap.add_argument("--eval-json", type=Path, help="the checkpoint's `ghosted eval --ppl wiki --out` file from an "
                                                   "earlier run with the same windows (skips the folder evaluation)")
    ap.add_argument("--outtypes", default="f32,f16")
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=0.01, help="allowed relative PPL difference for f32")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "gguf_llamacpp.md")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed comparison with the dense GGUF")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        import llama_cpp
    except ImportError:
        sys.exit('llama-cpp-python is not installed: pip install -e ".[gguf]" (builds llama.cpp, minutes)')
    from ghosted.corpora import adds_bos, load_documents, make_windows
    from ghosted.io import write_text_atomic
    from ghosted.models import load_tokenizer

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        tmp = Path(tmp)
        tiny = tiny_logits_check(tmp, args.threads)
        if args.ckpt:
            ckpt, prune_cmd = args.ckpt, None
        else:
            ckpt = tmp / "ckpt"
            prune_cmd = ["prune", args.model, "--layers", args.layers, "--recovery", args.recovery, "--n-seqs",
                         str(args.n_seqs), "--seq-len", str(args.calib_seq_len), "--out", str(ckpt), "--quiet"]
            _ghosted(*prune_cmd)
        meta = json.loads((ckpt / "config.json").read_text()).get("ghosted", {})
        eval_json = args.eval_json or tmp / "eval.json"
        if args.eval_json is None:
            _ghosted("eval", str(ckpt), "--tasks", "none", "--ppl", "wiki", "--ppl-windows", str(args.ppl_windows),
                     "--seq-len", str(args.seq_len), "--out", str(eval_json), "-q")
        folder = json.loads(eval_json.read_text())["ppl"]["wiki"]
        if (folder["windows"], folder["seq_len"]) != (args.ppl_windows, args.seq_len):
            sys.exit(f"{eval_json}: {folder['windows']} windows of {folder['seq_len']} tokens, not "
                     f"{args.ppl_windows} of {args.seq_len}")

        tok, _ = load_tokenizer(str(ckpt))  # a ghost checkpoint's tokenizer without running its code
        docs = load_documents("wiki")
        # The first N windows of the source: the same ones ghosted's perplexity takes (tokenizing stops early).
        windows = make_windows(tok, docs, args.seq_len, args.ppl_windows).numpy()
        rows = []
        agree = None
        for outtype in args.outtypes.split(","):
            gguf_path = tmp / f"model-{outtype}.gguf"
            _ghosted("export", str(ckpt), "--gguf", str(gguf_path), "--outtype", outtype)
            t0 = time.perf_counter()
            nll, scored = llamacpp_nll(gguf_path, windows, args.threads)
            ppl = math.exp(nll)
            rows.append({"outtype": outtype, "mib": gguf_path.stat().st_size / 2**20, "ppl": ppl,
                         "rel": ppl / folder["ppl"] - 1, "scored": scored, "seconds": time.perf_counter() - t0})
            if agree is None:
                agree = tokenizer_agreement(gguf_path, tok, docs, 200)
            if outtype == "f32":
                rows[-1]["greedy"] = greedy_check(ckpt, gguf_path, args.threads)
                print(f"f32: greedy continuations identical for {rows[-1]['greedy'][0]} of {len(PROMPTS)} prompts",
                      flush=True)
            if not args.no_speed:
                dense_path = tmp / f"dense-{outtype}.gguf"
                _ghosted("export", meta.get("base_model") or args.model, "--gguf", str(dense_path), "--outtype",
                         outtype)
                rows[-1]["speed"] = speed(gguf_path, args.threads)
                rows[-1]["dense_speed"] = speed(dense_path, args.threads)
                print(f"{outtype}: speed {rows[-1]['speed']} vs dense {rows[-1]['dense_speed']}", flush=True)
            print(f"{outtype}: llama.cpp PPL {ppl:.4f} vs folder {folder['ppl']:.4f} ({rows[-1]['rel']:+.3%})",
                  flush=True)
    f32 = next((r for r in rows if r["outtype"] == "f32"), None)
    ok = f32 is not None and abs(f32["rel"]) <= args.tolerance
    shown_prune = " ".join(["ghosted", *prune_cmd]).replace(str(ckpt), "CKPT") if prune_cmd else None
    lines = [
        f"# llama.cpp reads `ghosted export --gguf`: {meta.get('base_model', ckpt)} with layers "
        f"{meta.get('removed_layers')} removed, recovery {meta.get('recovery')}",
        "",
        "Generated by `scripts/gguf_llamacpp_check.py` (do not edit). Command: `"
        + f".venv/bin/python scripts/gguf_llamacpp_check.py {' '.join(sys.argv[1:])}".rstrip() + "`.",
        "",
        f"- checkpoint: {'`' + shown_prune + '`' if shown_prune else ckpt} ({meta.get('num_layers')} layers)",
        f"- folder: `ghosted eval CKPT --tasks none --ppl wiki --ppl-windows {args.ppl_windows} --seq-len "
        f"{args.seq_len}`: wiki PPL {folder['ppl']:.4f} ({folder['tokens_scored']} tokens scored)"
        + (f" (from {args.eval_json.name}, an earlier run of that command)" if args.eval_json else ""),
        f"- GGUF: `ghosted export CKPT --gguf OUT.gguf --outtype T`, run by llama.cpp through llama-cpp-python "
        f"{llama_cpp.__version__} (`logits_all`, one `eval` per window, KV cache reset between windows, "
        f"{args.threads} threads) on the same {windows.shape[0]} windows of {args.seq_len} tokens "
        f"(BOS first: {'yes' if adds_bos(tok) else 'no, the tokenizer adds none'}), NLL from llama.cpp's logits in "
        "float64",
        f"- tokenizer: llama.cpp's own tokenizer (from the GGUF's metadata) splits {agree[0]} of the first "
        f"{agree[1]} wiki passages exactly like the checkpoint's tokenizer (the perplexity above feeds token ids, "
        "so it does not depend on this)",
        "",
        "| outtype | GGUF MiB | llama.cpp PPL | folder PPL | difference | llama.cpp seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['outtype']} | {r['mib']:.1f} | {r['ppl']:.4f} | {folder['ppl']:.4f} | {r['rel']:+.3%} | "
                     f"{r['seconds']:.1f} |")
    greedy = next((r["greedy"] for r in rows if "greedy" in r), None)
    if greedy is not None:
        lines += ["", f"Greedy generation, llama.cpp f32 against the folder (`ghosted.load`, `generate(do_sample=False)`), "
                  f"32 new tokens from each of {len(PROMPTS)} prompts (scripts/gguf_llamacpp_check.py PROMPTS): "
                  f"identical for {greedy[0]} of {len(PROMPTS)}." + ("" if not greedy[1] else " " + "; ".join(greedy[1]))]
    timed = [r for r in rows if "speed" in r]
    if timed:
        lines += ["", f"llama.cpp speed, {args.threads} threads, best of 3 after a warm-up: a 256-token prompt (prefill), "
                  "then 64 single-token steps (decode); the dense GGUF is `ghosted export "
                  f"{meta.get('base_model') or args.model} --gguf` at the same outtype:", "",
                  "| outtype | pruned prefill tok/s | dense prefill tok/s | speed-up | pruned decode tok/s | "
                  "dense decode tok/s | speed-up |", "|---|---|---|---|---|---|---|"]
        for r in timed:
            p, dn = r["speed"], r["dense_speed"]
            lines.append(f"| {r['outtype']} | {p['prefill_tps']:.0f} | {dn['prefill_tps']:.0f} | "
                         f"{p['prefill_tps'] / dn['prefill_tps']:.2f}x | {p['decode_tps']:.1f} | "
                         f"{dn['decode_tps']:.1f} | {p['decode_tps'] / dn['decode_tps']:.2f}x |")
    lines += ["", "Tiny random models (hidden 32, 6 layers, byte-level BPE of 300 tokens; tests/test_export.py), "
              "f32 export, llama.cpp logits against transformers' on the same 40 tokens (llama.cpp keeps its KV cache "
              "in f16, hence differences around 1e-3 to 1e-2):", "",
              "| family | layer types (S sliding, F full) | max abs logit difference | max abs logit | same argmax |",
              "|---|---|---|---|---|"]
    for r in tiny:
        kinds = "".join("S" if t == "sliding_attention" else "F" for t in r["layer_types"]) if r["layer_types"] else "-"
        lines.append(f"| {r['family']} | {kinds} | {r['max_diff']:.2e} | {r['max_logit']:.2f} | "
                     f"{r['argmax_equal']:.0%} |")
    lines += ["", f"f32 within {args.tolerance:.0%} of the folder: {'yes' if ok else 'NO'}. "
              f"Total wall time {time.perf_counter() - t_start:.0f} s.", ""]
    write_text_atomic(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
