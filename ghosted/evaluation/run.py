"""`ghosted eval`: quality (perplexity, zero-shot) and, if asked, efficiency of one model.

Quality is perplexity on text sources (protocol in perplexity.py) plus zero-shot accuracy through lm-eval
(zeroshot.py), on an in-memory model: evaluate_quality also serves every cell of a grid (ghosted/solve/grid.py).
Every result carries a `provenance` block (provenance.py): the model's identity (a checkpoint's content sha256,
else its base fingerprint) and the protocol's hash, which `ghosted register` checks. Efficiency of a model is
measured in a fresh Python process (a spawned worker running measure_loaded), one per model, so that CPU peak RSS
reflects that model alone and not what this process did before.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghosted.errors import GhostedError
from ghosted.evaluation.provenance import PROVENANCE_KEY, model_identity, provenance
from ghosted.method import arch
from ghosted.version import __version__

if TYPE_CHECKING:
    from ghosted.config import EfficiencySettings, EvalSettings

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


def evaluate_quality(model: Any, tokenizer: Any, settings: EvalSettings, progress: bool = True) -> dict:
    """Perplexity on each source and zero-shot accuracy of an in-memory model (dense, pruned or patched)."""
    from ghosted.evaluation.perplexity import perplexity
    from ghosted.evaluation.zeroshot import evaluate_zeroshot

    t0 = time.perf_counter()
    ppl = {src: perplexity(model, tokenizer, src, seq_len=settings.seq_len, windows=settings.ppl_windows,
                           batch_size=settings.batch_size, progress=progress)
           for src in settings.ppl}
    zeroshot = None
    if settings.tasks:
        zeroshot = evaluate_zeroshot(model, tokenizer, settings.tasks, settings.limit, batch_size=settings.batch_size,
                                     progress=progress)
    return {"ppl": ppl, "zeroshot": zeroshot, "seconds": time.perf_counter() - t0}


def checkpoint_folder(ref) -> Path | None:
    """The folder whose *.safetensors are the model's checkpoint (None for GGUF files and hub ids)."""
    if ref.kind in ("folder", "shipped") and any(Path(ref.path).glob("*.safetensors")):
        return Path(ref.path)
    return None


def measure_loaded(loaded, eff: EfficiencySettings) -> dict:
    """measure_efficiency of an already loaded model, in THIS process (the worker side)."""
    from ghosted.evaluation.efficiency import measure_efficiency

    stats = measure_efficiency(loaded.model, loaded.tokenizer, batch_sizes=eff.batch_sizes, prompt_len=eff.prompt_len,
                               new_tokens=eff.new_tokens, repeats=eff.repeats,
                               checkpoint_dir=checkpoint_folder(loaded.ref))
    stats["model"] = loaded.ref.name
    return stats


def _measure_in_worker(model: str, eff: EfficiencySettings, dtype: str, device: str,
                       device_map: str | None) -> dict:
    """The worker side of measure_isolated: load `model` in this (fresh) process and measure it, as JSON data."""
    from ghosted.models import load_model

    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
    return json.loads(json.dumps(measure_loaded(loaded, eff), default=float))


def measure_isolated(model: str, eff: EfficiencySettings, dtype: str = "float32", device: str = "cpu",
                     device_map: str | None = None) -> dict:
    """measure_efficiency of `model` in a fresh Python process: peak memory counts that model alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_measure_in_worker, model, eff, dtype, device, device_map).result()
        except Exception as exc:  # noqa: BLE001 - the worker's error (or its death), named with the model
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise GhostedError(f"efficiency measurement of {model} failed: {why}") from exc


def evaluate_model(model: str, settings: EvalSettings, *, dtype: str = "float32", device: str = "cpu",
                   device_map: str | None = None, efficiency: EfficiencySettings | None = None,
                   baseline: str | None = None, progress: bool = True, log: Log = _nolog) -> dict:
    """Everything `ghosted eval` reports for one model: perplexity, zero-shot accuracy and, if asked, efficiency
    (with `baseline`: the dense model measured in the same run, and pruned/dense ratios)."""
    from ghosted.config import EfficiencySettings, to_json
    from ghosted.models import load_model, resolve

    t0 = time.perf_counter()
    ref = resolve(model)
    if baseline is not None:
        resolve(baseline)
        efficiency = efficiency or EfficiencySettings()
    if efficiency is None and not settings.tasks and not settings.ppl:
        raise GhostedError("nothing to evaluate: give --tasks, --ppl or --efficiency")
    result: dict[str, Any] = {"model": ref.name, "dtype": dtype, "device": device}
    identity = model_identity(ref)  # before anything runs: the bytes that are then evaluated
    if efficiency is not None:  # before this process loads anything: the machine is quiet while it times
        result["efficiency"] = efficiency_report(model, efficiency, dtype, device, baseline, log, device_map)
    result["ppl"] = {}
    result["zeroshot"] = None
    if settings.tasks or settings.ppl:
        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map)
        log(f"loaded {model} ({type(loaded.model).__name__}, {arch.num_layers(loaded.model)} layers)")
        quality = evaluate_quality(loaded.model, loaded.tokenizer, settings, progress)
        result["ppl"], result["zeroshot"] = quality["ppl"], quality["zeroshot"]
    result["settings"] = to_json(settings)
    result["versions"] = versions()
    result[PROVENANCE_KEY] = provenance(identity, result["ppl"], result["zeroshot"], settings.limit,
                                        result["versions"])
    result["seconds"] = time.perf_counter() - t0
    return result


def efficiency_report(model: str, eff: EfficiencySettings, dtype: str, device: str, baseline: str | None,
                      log: Log = _nolog, device_map: str | None = None) -> dict:
    """Efficiency of `model` (and of `baseline`, with pruned/dense ratios), each measured in its own process."""
    from ghosted.config import to_json
    from ghosted.evaluation.efficiency import efficiency_ratios

    out: dict[str, Any] = {"isolation": "each model measured in a fresh process", "settings": to_json(eff)}
    log(f"measuring efficiency of {model} on {device} (own process)")
    out["model"] = measure_isolated(model, eff, dtype, device, device_map)
    if baseline is not None:
        log(f"measuring efficiency of the baseline {baseline} on {device} (own process)")
        out["baseline"] = measure_isolated(baseline, eff, dtype, device, device_map)
        out["ratios"] = efficiency_ratios(out["baseline"], out["model"])
    return out


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    import torch
    import transformers

    out = {"ghosted": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import lm_eval

        out["lm_eval"] = lm_eval.__version__
    except ImportError:
        pass
    return out
