"""Where the resident memory of `ghosted prune` goes, stage by stage, per calibration size.

    python -m studies.memory_profile smollm2-135m --n-seqs 32,128 --seq-len 128 --remove 7 \
        --out reports/memory_profile/memory_profile.md

Each calibration size runs in a fresh process (`--one`). A sampler thread reads the resident set
(/proc/self/status VmRSS) and glibc's heap counters (mallinfo2: bytes malloc'd and live, bytes free in the
arenas) every 2 ms and books them to the innermost stage running (capture, selection, fit, guard, held-out
evaluation, checkpoint save). torch's CPU tensors are malloc'd, so `live` counts them; weights loaded from
safetensors are file pages (RSS, not malloc). The breakdown of the peak is measured, not estimated:
runtime = RSS before loading (`bench.runtime_baseline`, as `ghosted bench` takes it: before and after importing
the architecture's transformers modeling code, both reported), weights = parameter bytes, sums = the distinct
float64 tensors the capture returned, allocator free = mallinfo2's free bytes at the peak; one batch is the peak stage's
per-batch formula (stated in the report), `other live` the rest of the live heap growth over the start of
prune; `rest` is what is left (file pages beyond the parameters, thread stacks).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from studies.common import ROOT

MiB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap() -> tuple[int, int]:
    """(live malloc'd bytes incl. mmapped chunks, free bytes kept in the arenas)."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Sampler:
    """Peak RSS per stage, with the heap counters at that peak."""

    def __init__(self) -> None:
        self.stack = ["setup"]
        self.peaks: dict[str, tuple[int, int, int]] = {}  # stage -> (rss, live, free) at its peak
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            self.sample()
            time.sleep(0.002)

    def sample(self) -> None:
        stage, r = self.stack[-1], rss()
        if r > self.peaks.get(stage, (0, 0, 0))[0]:
            self.peaks[stage] = (r, *heap())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._thread.join()

    def wrap(self, owner, name: str, stage: str) -> None:
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            self.sample()
            self.stack.append(stage)
            try:
                return fn(*a, **k)
            finally:
                self.sample()
                self.stack.pop()
        setattr(owner, name, wrapped)


def one(model: str, n: int, seq_len: int, remove: int, batch_size: int, guard: str) -> dict:
    """One calibration size in this process: prune (default selection, the given guard) and save."""
    import torch

    from ghosted.calibration.capture import capture_batch
    from ghosted.checkpoint import format as checkpoint
    from ghosted.evaluation import bench, perplexity
    from ghosted.solve import solver as prune

    base = bench.runtime_baseline(model)
    s = Sampler()
    captured = []
    s.wrap(prune, "capture", "capture")
    orig_capture = prune.capture
    prune.capture = lambda *a, **k: captured.append(orig_capture(*a, **k)) or captured[-1]
    s.wrap(prune, "solve_cut", "fit")
    s.wrap(prune, "_guard", "guard")
    s.wrap(prune, "mean_nll", "held-out evaluation")
    s.wrap(perplexity, "mean_nll", "held-out evaluation")
    s.wrap(checkpoint, "save", "checkpoint save")
    sel = prune.SELECTION.get

    def get(name):
        fn = sel(name)

        def selected(*a, **k):
            s.stack.append("selection")
            try:
                return fn(*a, **k)
            finally:
                s.stack.pop()
        return selected
    prune.SELECTION.get = get
    loaded = bench.load_bench_model(model, "float32", "cpu")
    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    calib = bench.bench_calibration(loaded, n, seq_len)
    for p in loaded.model.parameters():  # page every weight in, as the dense forward of `bench` does
        p.data.sum()
    L, d = int(loaded.model.config.num_hidden_layers), int(loaded.model.config.hidden_size)  # before pruning
    V = int(loaded.model.get_output_embeddings().weight.shape[0])
    s.start()
    start_rss, (start_live, _) = rss(), heap()
    cfg = prune.PruneConfig(remove=remove, guard=guard, batch_size=batch_size)
    sol = prune.solve(loaded, calib, cfg, progress=False, log=lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        s.stack.append("apply + save")
        prune.build_checkpoint(loaded, sol, calib.sha256, Path(tmp) / "ckpt")
        s.stack.pop()
    s.stop()
    seen: dict[int, int] = {}
    for res in captured:
        for group in (res.fit, res.heldout, res.fit_left_out, res.heldout_left_out):
            for ps in group.values():
                for t in ps.state_dict().values():
                    if t.numel() > 1:
                        seen[t.data_ptr()] = t.numel() * t.element_size()
        for t in (res.cos_sum, res.ang_sum):
            if t is not None:
                seen[t.data_ptr()] = t.numel() * t.element_size()
    stage, (peak, live, free) = max(s.peaks.items(), key=lambda kv: kv[1][0])
    return {"model": model, "n_seqs": n, "seq_len": seq_len, "batch_size": batch_size, "remove": remove,
            "guard": guard, "layers": L, "hidden": d, "removed": sol.removed,
            "capture_passes": sol.meta.capture_passes, "runtime": base["runtime_bytes"],
            "preload": base["preload_bytes"], "model_code": base["model_code"], "params": params,
            "start_rss": start_rss, "start_live": start_live, "peak_stage": stage, "peak": peak,
            "peak_live": live, "peak_free": free, "sums": sum(seen.values()),
            "capture_batch": capture_batch(batch_size, L + 1, seq_len, d, 4),
            "one_batch_states": (L + 1) * capture_batch(batch_size, L + 1, seq_len, d, 4) * seq_len * d * 4,
            "vocab": V,
            "chunk_rows": perplexity.chunk_rows(V),
            "logit_chunk": 2 * min(perplexity.chunk_rows(V), batch_size * (seq_len - 1)) * V * 4,
            "split_head": perplexity.split_head(loaded.model) is not None,
            "stages": {k: list(v) for k, v in s.peaks.items()}, "torch_threads": torch.get_num_threads()}


def _batch_term(r: dict) -> int:
    """The per-batch bytes the peak stage holds by its formula (to_markdown states them)."""
    if r["peak_stage"] == "capture":
        return r["one_batch_states"]
    if r["peak_stage"] == "held-out evaluation":
        return r["batch_size"] * r["seq_len"] * r["hidden"] * 4 + r["logit_chunk"]
    return 0


def to_markdown(runs: list[dict], command: str, note: str) -> str:
    r0 = runs[0]
    out = [f"# Memory profile of `ghosted prune {r0['model']}` (CPU, float32)", "",
           f"Generated by `{command}`. {note}", "",
           f"Configuration: remove {r0['remove']} of {r0['layers']} layers, default selection (angular), guard "
           f"{r0['guard']}, batch {r0['batch_size']} x {r0['seq_len']} tokens, d = {r0['hidden']}; each size in a "
           "fresh process. MiB; `live` = glibc malloc'd bytes in use, `free` = bytes glibc keeps in its arenas.", "",
           "## Where the peak goes", "",
           "| | " + " | ".join(f"{r['n_seqs']} windows" for r in runs) + " |",
           "|---|" + "---|" * len(runs)]

    def row(label: str, vals: list[float]) -> None:
        out.append(f"| {label} | " + " | ".join(f"{v / MiB:.0f}" for v in vals) + " |")

    row("peak RSS of prune + fit + save", [r["peak"] for r in runs])
    row("runtime before loading (interpreter, torch, ghosted, transformers' core)", [r["preload"] for r in runs])
    row(f"the architecture's modeling code imported ({r0['model_code'] or 'none without loading'})",
        [r["runtime"] - r["preload"] for r in runs])
    row("weights (parameter bytes)", [r["params"] for r in runs])
    row("float64 sums kept by the capture (grams, crosses, score tables)", [r["sums"] for r in runs])
    row("one batch by the peak stage's formula (below): capture (L+1) B' T d b, held-out B T d b + 2 R V 4",
        [_batch_term(r) for r in runs])
    row("other live heap growth at the peak (layer activations, operators)",
        [r["peak_live"] - r["start_live"] - r["sums"] - _batch_term(r) for r in runs])
    row("allocator free lists at the peak (glibc arenas)", [r["peak_free"] for r in runs])
    row("rest (file pages beyond the weights, heap before prune, stacks)",
        [r["peak"] - r["runtime"] - r["params"] - (r["peak_live"] - r["start_live"]) - r["peak_free"] for r in runs])
    out += ["", "Peak / parameter bytes, net of the runtime with the modeling code imported (the `ghosted bench` "
            "measure, `peak_over_model`): " +
            ", ".join(f"{r['n_seqs']} windows {(r['peak'] - r['runtime']) / r['params']:.2f}" for r in runs) +
            "; net of the RSS before the modeling code was imported (the earlier definition, "
            "`peak_over_model_preload`): " +
            ", ".join(f"{r['n_seqs']} windows {(r['peak'] - r['preload']) / r['params']:.2f}" for r in runs) +
            "; peak stage: " + ", ".join(f"{r['n_seqs']}: {r['peak_stage']}" for r in runs) + ".", "",
            "Where the peak of each stage comes from (bytes; W = parameter bytes, b = 4 for float32, B = batch "
            f"= {r0['batch_size']}, B' = {r0.get('capture_batch', r0['batch_size'])} windows per capture forward "
            "(`capture.capture_batch`: as many as keep (L+1) B' T d b within 64 MiB, at least one), "
            f"T = {r0['seq_len']}, L = {r0['layers']}, d = {r0['hidden']}, V = {r0['vocab']}, "
            f"R = {r0['chunk_rows']} tokens per LM-head chunk (`perplexity.chunk_rows`: 32 MiB of float32 logits, "
            "64..1024 tokens), G token groups, S start boundaries and C cuts whose sums are kept):", "",
            "    capture              W + (L+1) B' T d b + 8 d^2 G (S + C) + 16 (L+1)^2 + one layer's activations",
            "    held-out evaluation  W + B T d b + 2 R V 4 + one layer's activations + the sums",
            "    checkpoint save      W + 1M elements of the finiteness check (safetensors writes from the tensors)",
            "",
            "The loss never holds a batch's logits (B T V 4 bytes, " +
            ", ".join(f"{r['batch_size'] * r['seq_len'] * r['vocab'] * 4 / MiB:.0f} MiB" for r in runs[:1]) +
            " here); " + ("the LM head runs on R tokens at a time." if r0.get("split_head") else
                          "THIS MODEL'S HEAD IS NOT IN perplexity.HEAD_POST: the plain forward with full logits ran."),
            "",
            "## Peak RSS per stage (MiB: rss / live / free at that stage's peak)", "",
            "| stage | " + " | ".join(f"{r['n_seqs']} windows" for r in runs) + " |",
            "|---|" + "---|" * len(runs)]
    stages = list(dict.fromkeys(k for r in runs for k in r["stages"]))
    for st in stages:
        cells = []
        for r in runs:
            v = r["stages"].get(st)
            cells.append("-" if v is None else f"{v[0] / MiB:.0f} / {v[1] / MiB:.0f} / {v[2] / MiB:.0f}")
        out.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.memory_profile", description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n-seqs", default="8,32")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--remove", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--guard", default="loss")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.model, a.one, a.seq_len, a.remove, a.batch_size, a.guard)))
        return
    runs = []
    for n in (int(x) for x in a.n_seqs.split(",")):
        cmd = [sys.executable, "-m", "studies.memory_profile", a.model, "--one", str(n), "--seq-len", str(a.seq_len), "--remove",
               str(a.remove), "--batch-size", str(a.batch_size), "--guard", a.guard]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    command = "python -m studies.memory_profile " + " ".join(sys.argv[1:])
    md = to_markdown(runs, command, a.note)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md)
        a.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
