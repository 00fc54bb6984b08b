"""`ghosted bench`: how close prune+fit sits to its physical limit (a benchmark, not a test).

Reports, as ratios against their targets:
- prune+fit wall time / one dense forward over the same calibration set (TARGETS below: <= 1.1 on a quiet machine);
- peak memory / model size, per calibration size (<= 1.5, and the largest size within 10% of the smallest);
- pruned+ghost prefill and decode throughput / the ideal L / (L - k) speed-up (>= 0.98).
Each calibration size runs in its own process so peak memory is that run's alone. Peak memory is
the device's allocator peak on a GPU; on the CPU the process's resident high-water mark, reset after
loading and after the timed dense forward (/proc/self/clear_refs), net of the runtime's own memory
(runtime_bytes: the interpreter and libraries including the architecture's transformers modeling code,
before any weight or tokenizer is read; see runtime_baseline): the memory of prune + fit alone. The ratio
net of the RSS before that modeling code was imported (the earlier definition) is reported beside it
(peak_over_model_preload).

MODEL may also be `random:PRESET` (e.g. random:llama-8b) or `random:path/config.json`: that
architecture with random weights (seed 0) built directly on the device, and random calibration tokens,
for measuring the cost at a scale whose weights are not at hand.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ghosted.config import PruneConfig
from ghosted.corpora import Calibration, build_calibration, tokens_sha256
from ghosted.errors import GhostedError, brief
from ghosted.evaluation.harness import peak_memory, proc_bytes, sync
from ghosted.json_io import read_json
from ghosted.memory import release_memory
from ghosted.method import arch
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import Loaded, ModelRef, load_model
from ghosted.solve.solver import solve

# The benchmark's targets: prune+fit / one dense forward on a quiet machine, peak / parameter bytes,
# pruned+ghost throughput / the ideal speed-up.
TARGETS = {"fit_over_forward": 1.1, "peak_over_model": 1.5, "throughput_over_ideal": 0.98}

# Real configurations for random-weight runs (bench only).
PRESETS: dict[str, dict] = {
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


def random_spec(name: str) -> str:
    """The preset name or config.json path of `random:SPEC`; a clear error when it is neither."""
    spec = name.removeprefix("random:")
    if spec not in PRESETS and not Path(spec).is_file():
        raise GhostedError(f"unknown random model '{spec}': use a preset ({', '.join(PRESETS)}) or a config.json path")
    return spec


def random_config(spec: str):
    """The transformers config of a preset name or a config.json path (see random_spec)."""
    from transformers import AutoConfig

    if spec in PRESETS:
        cfg = dict(PRESETS[spec])
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    doc = read_json(spec, "model config", expect=dict, fix="give a model's config.json")
    try:
        return AutoConfig.for_model(**doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise GhostedError(f"random:{spec}: not a transformers model config ({brief(str(exc), 120)})") from None


def check_bench(model_name: str, seq_len: int, remove: int, prompt: int, new: int) -> None:
    """The limits that depend on the model, from its config alone, before any worker starts: --remove below its
    layers, --seq-len and --prompt + --new-tokens within its positions."""
    from ghosted.checks import check_seq_len
    from ghosted.models import load_tokenizer

    config = random_config(random_spec(model_name)) if model_name.startswith("random:") else \
        load_tokenizer(model_name)[1]
    layers = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    if isinstance(layers, int) and not 1 <= remove < layers:
        raise GhostedError(f"--remove must be between 1 and {layers - 1} for a {layers}-layer model, got {remove}")
    check_seq_len(config, seq_len)
    check_seq_len(config, prompt + new, "--prompt + --new-tokens", "use a shorter --prompt or fewer --new-tokens")


def load_bench_model(name: str, dtype: str, device: str) -> Loaded:
    """A real model (any name `ghosted prune` takes) or `random:PRESET|config.json` with random weights."""
    if not name.startswith("random:"):
        return load_model(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    from ghosted.models import parse_dtype

    spec = random_spec(name)
    config = random_config(spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    return Loaded(model.eval(), None, ModelRef(name, "random", spec))


def bench_calibration(loaded: Loaded, n: int, seq_len: int) -> Calibration:
    if loaded.tokenizer is not None:
        return build_calibration(loaded.tokenizer, "passages", n, seq_len, 0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.model.config.vocab_size, (n, seq_len), generator=g)
    return Calibration(ids, "random tokens", 0, tokens_sha256(ids))


def import_model_code(name: str) -> str | None:
    """Import the transformers modeling module of `name`'s architecture, reading only its config.json (no weight,
    no tokenizer): code, constant in the model's size. Returns the module, None where that needs more than the
    config (a GGUF file, a hub id, a ghosted checkpoint, a shipped model not converted yet)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ghosted.models import SHIPPED, resolve, shipped_folder

    if name.startswith("random:"):
        config = random_config(random_spec(name))
    else:
        if name in SHIPPED and not (shipped_folder(name) / "config.json").is_file():
            return None  # resolve() would convert the GGUF first
        ref = resolve(name)
        path = Path(ref.path) / "config.json"
        if ref.kind not in ("shipped", "folder") or "ghosted" in read_json(path, "model config", expect=dict):
            return None
        config = AutoConfig.from_pretrained(ref.path)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__
    except KeyError:
        return None


def runtime_baseline(name: str) -> dict:
    """The resident bytes the peak of a run is taken net of, under both definitions `ghosted bench` reports:
    preload_bytes, before anything of the model (interpreter, torch, ghosted, transformers' core), and
    runtime_bytes, after also importing the architecture's modeling code (`import_model_code`; for Llama it pulls
    in sympy, scipy and accelerate, ~130 MiB): what any run of that architecture holds, whatever its size."""
    preload = proc_bytes("VmRSS") or 0
    module = import_model_code(name)
    release_memory()
    return {"preload_bytes": preload, "runtime_bytes": proc_bytes("VmRSS") or 0, "model_code": module,
            "runtime_includes": "interpreter, torch, ghosted, transformers" + (f", {module}" if module else "")}


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], batch_size):
        model(input_ids=ids[s:s + batch_size].to(device), use_cache=False)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def _one_run(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of one greedy generation with a KV cache."""
    device = ids.device
    sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    sync(device)
    t1 = time.perf_counter()
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t2 = time.perf_counter()
    return ids.shape[1] / (t1 - t0), new / (t2 - t1)


def run_one(model_name: str, n: int, seq_len: int, remove: int, device: str, dtype: str, batch_size: int,
            layerwise: bool = False, offload_budget: int | None = None) -> dict:
    """One calibration size, in this process: forward time, prune+fit time, peak memory."""
    base = runtime_baseline(model_name)  # the interpreter and libraries, before any weight is loaded
    runtime, preload = base["runtime_bytes"], base["preload_bytes"]
    loaded = load_bench_model(model_name, dtype, device)
    if layerwise:  # the capture moves one layer at a time to `device`, states beyond the budget go to files
        loaded.layerwise, loaded.capture_device, loaded.offload_budget = True, device, offload_budget
    model = loaded.model
    dev = next(model.parameters()).device
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = bench_calibration(loaded, n, seq_len)
    ids = calib.input_ids
    if dev.type == "cuda":
        runtime = preload = 0
    fwd = forward_seconds(model, ids, batch_size)
    release_memory()  # the forward's logits stay in glibc's free lists otherwise, and in the high-water mark
    cfg = PruneConfig(remove=remove, select="angular", recovery="ghost", guard="off", holdout=0.0,
                      token_policy="sink", batch_size=batch_size)
    # the peak belongs to prune+fit alone: the dense forward's logits ([batch, T, vocab]) are not part of it
    with peak_memory(dev) as memory:
        t0 = time.perf_counter()
        sol = solve(loaded, calib, cfg, progress=False, log=lambda m: None)
        sync(dev)
        fit = time.perf_counter() - t0
    if memory["peak_memory_bytes"] is None:  # no /proc: the process's peak over its whole life
        runtime = preload = 0
        peak = base_peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    else:
        peak = memory["peak_memory_bytes"]
        base_peak = peak - memory["peak_memory_delta_bytes"]
    return {"n_seqs": n, "seq_len": seq_len, "model_bytes": size, "dense_forward_s": fwd, "prune_fit_s": fit,
            "fit_over_forward": fit / fwd, "peak_bytes": peak - runtime, "peak_before_bytes": base_peak - runtime,
            "runtime_bytes": runtime, "runtime_includes": base["runtime_includes"] if runtime else "nothing",
            "peak_over_model": (peak - runtime) / size,
            # the earlier definition, net of the RSS before the model's code was imported
            "preload_bytes": preload, "peak_over_model_preload": (peak - preload) / size, "removed": sol.removed,
            "capture_passes": sol.meta.capture_passes,
            "hidden": model.config.hidden_size, "layers": arch.num_layers(model), "layerwise": layerwise,
            "offload_budget": offload_budget}


def run_speed(model_name: str, remove: int, device: str, dtype: str, prompt: int, new: int, repeats: int,
              removed: list[int]) -> dict:
    """Prefill / decode throughput, dense vs pruned with its ghost (and without), against the ideal L/(L-k).

    The three variants take turns inside every repeat, so a drift of the machine's speed hits all of
    them alike; the first round is a warm-up; medians are reported."""
    from ghosted.method.operator import Operator

    loaded = load_bench_model(model_name, dtype, device)
    model = loaded.model
    L = arch.num_layers(model)
    d = model.config.hidden_size
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    cut = (removed[0], removed[-1] + 1)
    ghost = Operator("full", W=torch.eye(d, dtype=torch.float64) + 1e-3 * torch.randn(d, d, dtype=torch.float64))
    runs: dict[str, list[tuple[float, float]]] = {"dense": [], "pruned_ghost": [], "pruned_plain": []}
    for r in range(repeats + 1):
        dense = _one_run(model, ids, new)
        with temporarily_pruned(model, removed, {cut: ghost}) as m:
            pruned = _one_run(m, ids, new)
        with temporarily_pruned(model, removed) as m:
            plain = _one_run(m, ids, new)
        if r:  # round 0 warms up
            for key, v in (("dense", dense), ("pruned_ghost", pruned), ("pruned_plain", plain)):
                runs[key].append(v)
    res = {key: {"prefill_tok_s": statistics.median([v[0] for v in vals]), "decode_tok_s": statistics.median([v[1] for v in vals])}
           for key, vals in runs.items()}
    ideal = L / (L - len(removed))
    out = {"ideal_speedup": ideal, "prompt": prompt, "new_tokens": new, "repeats": repeats, **res}
    for key in ("prefill_tok_s", "decode_tok_s"):
        sp = res["pruned_ghost"][key] / res["dense"][key]
        out[f"{key}_speedup"] = sp
        out[f"{key}_over_ideal"] = sp / ideal
        out[f"{key}_ghost_overhead"] = 1 - res["pruned_ghost"][key] / res["pruned_plain"][key]
    return out


def _run_one_in_worker(*args) -> dict:
    """run_one in a fresh process (bench() spawns one per calibration size), as JSON data."""
    return json.loads(json.dumps(run_one(*args)))


def bench(model_name: str, sizes: list[int], seq_len: int, remove: int, device: str = "cpu", dtype: str = "float32",
          batch_size: int = 4, prompt: int = 256, new: int = 32, repeats: int = 3, layerwise: bool = False,
          offload_budget: int | None = None) -> dict:
    """Every calibration size in a fresh process, then the speed test; returns the whole report."""
    check_bench(model_name, seq_len, remove, prompt, new)  # fail before the first worker process
    runs = []
    for n in sizes:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                runs.append(pool.submit(_run_one_in_worker, model_name, n, seq_len, remove, device, dtype,
                                        batch_size, layerwise, offload_budget).result())
            except Exception as exc:  # noqa: BLE001 - the worker's error (or its death), named with the size
                why = " ".join(str(exc).split()) or type(exc).__name__
                raise GhostedError(f"bench run with {n} sequences failed: {why}") from exc
    speed = run_speed(model_name, remove, device, dtype, prompt, new, repeats, runs[0]["removed"])
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"model": model_name, "device": name, "dtype": dtype, "torch_threads": torch.get_num_threads(),
            "layerwise": layerwise, "offload_budget": offload_budget,
            "runs": runs, "speed": speed,
            "targets": dict(TARGETS)}


def to_markdown(r: dict) -> str:
    t = {**TARGETS, **r.get("targets", {})}
    lw = "" if not r.get("layerwise") else f", --layerwise, offload budget {r.get('offload_budget')} bytes"
    lines = [f"# ghosted bench: {r['model']} on {r['device']} ({r['dtype']}{lw})", "",
             "Peak memory: " + ("the GPU allocator's peak" if "CPU" not in r["device"] else
                                "resident high-water mark during prune + fit, net of the runtime (RSS with "
                                f"{r['runs'][0].get('runtime_includes', 'the libraries')} imported, before any "
                                "weight or tokenizer is read); `net of pre-load RSS`: the same peak net of the RSS "
                                "before the modeling code was imported") + "; model size = parameter bytes.", "",
             f"| calibration | dense forward s | prune+fit s | ratio (target <= {t['fit_over_forward']}) "
             f"| peak / model size (target <= {t['peak_over_model']}) "
             "| net of pre-load RSS |",
             "|---|---|---|---|---|---|"]
    for x in r["runs"]:
        pre = x.get("peak_over_model_preload")
        lines.append(f"| {x['n_seqs']} x {x['seq_len']} | {x['dense_forward_s']:.1f} | {x['prune_fit_s']:.1f} | "
                     f"{x['fit_over_forward']:.2f} | {x['peak_over_model']:.2f} | "
                     f"{'-' if pre is None else f'{pre:.2f}'} |")
    s = r["speed"]
    lines += ["", f"Throughput, pruned + ghost vs dense (ideal speed-up L/(L-k) = {s['ideal_speedup']:.3f}, target >= {t['throughput_over_ideal']} of it):", "",
              "| | dense tok/s | pruned+ghost tok/s | pruned, no ghost tok/s | speed-up | / ideal | ghost overhead |",
              "|---|---|---|---|---|---|---|"]
    for key, label in (("prefill_tok_s", f"prefill ({s['prompt']} tokens, batch 1)"), ("decode_tok_s", f"decode ({s['new_tokens']} tokens, batch 1)")):
        lines.append(f"| {label} | {s['dense'][key]:.0f} | {s['pruned_ghost'][key]:.0f} | {s['pruned_plain'][key]:.0f} | "
                     f"{s[f'{key}_speedup']:.3f} | {s[f'{key}_over_ideal']:.3f} | {100 * s[f'{key}_ghost_overhead']:.1f}% |")
    lines += ["", f"Median of {s.get('repeats', '?')} rounds in which the three variants take turns (after a warm-up round)."]
    return "\n".join(lines) + "\n"
