"""Size, latency, throughput and peak memory of a causal LM, dense or pruned, on CPU or CUDA.

Inputs are random token ids from a seeded generator, so no tokenizer or data is needed.
Timings: one warm-up, then the median of `repeats` runs, with torch.cuda.synchronize
around every timed region on CUDA.

Peak memory per batch size, over one prefill and one generate call:
- CUDA: torch.cuda.max_memory_allocated (absolute, weights included) and its rise over the
  memory allocated before the run ("peak_memory_delta_bytes").
- CPU on Linux: the process's peak resident set size (VmHWM, reset through
  /proc/self/clear_refs before the run) and its rise over the RSS before the run. RSS counts
  everything the process touches in that window (other threads too), and memory the
  allocator keeps from earlier work is reused without raising it: compare models each
  measured in a fresh process, never with CUDA numbers.
- Elsewhere: None, with memory_method "unavailable".
"""

from __future__ import annotations

import contextlib
import inspect
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ghosted.errors import GhostedError

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ----------------------------------------------------------------------------- memory probes


def _proc_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", _PROC_STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_PROC_STATUS}")
    return int(match.group(1)) * 1024


def _cpu_peak_rss_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _peak_memory(device: torch.device, method: str) -> Iterator[dict[str, int | None]]:
    """Yields a dict filled on exit with peak_memory_bytes and peak_memory_delta_bytes."""
    out: dict[str, int | None] = {"peak_memory_bytes": None, "peak_memory_delta_bytes": None}
    if method == "cuda_max_memory_allocated":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_memory_bytes=peak, peak_memory_delta_bytes=peak - before)
    elif method == "linux_peak_rss":
        _CLEAR_REFS.write_text("5")
        before = _proc_kib("VmRSS")
        yield out
        peak = _proc_kib("VmHWM")
        out.update(peak_memory_bytes=peak, peak_memory_delta_bytes=max(peak - before, 0))
    else:
        yield out


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


# ----------------------------------------------------------------------------- model facts


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration as err:
        raise GhostedError("the model has no parameters; pass a loaded causal LM") from err


def _weights_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding and, when not tied to it, the output head."""
    seen: set[int] = set()
    total = 0
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(weight) not in seen:
            seen.add(id(weight))
            total += weight.numel()
    return total


def checkpoint_bytes(checkpoint_dir: Path) -> int:
    """Total size of the *.safetensors files in a saved model folder."""
    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise GhostedError(f"no *.safetensors files in checkpoint_dir {checkpoint_dir}; pass a saved model folder")
    return sum(f.stat().st_size for f in files)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------- public API


def measure_efficiency(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    device: str | torch.device | None = None,
    checkpoint_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Parameter count, checkpoint size, prefill latency, decode throughput and peak memory per batch size.

    The model is measured where it is (`device`, if given, must be where it lives); the tokenizer
    only narrows the random ids to real tokens and supplies a pad id.
    """
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise GhostedError(f"batch_sizes must be whole numbers >= 1, got {batch_sizes!r}")
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GhostedError(f"{name} must be a whole number >= {low}, got {value!r}")
    model_device = _model_device(model)
    device = torch.device(device) if device is not None else model_device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device != model_device:
        raise GhostedError(f"the model is on {model_device} but device={device}; move it first with model.to('{device}')")

    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer)) if vocab else len(tokenizer)
    if vocab < 1:
        raise GhostedError("cannot tell the vocabulary size: the model has no config.vocab_size; pass its tokenizer")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and prompt_len + new_tokens > max_positions:
        raise GhostedError(
            f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's "
            f"max_position_embeddings {max_positions}; lower prompt_len or new_tokens"
        )
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(pad_id, list):
        pad_id = pad_id[0] if pad_id else None
    pad_id = 0 if pad_id is None else int(pad_id)

    memory_method = (
        "cuda_max_memory_allocated"
        if device.type == "cuda"
        else "linux_peak_rss"
        if _cpu_peak_rss_supported()
        else "unavailable"
    )
    # logits for the last position only, as generate's prefill does (when the forward takes it)
    prefill_kwargs: dict[str, Any] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        prefill_kwargs["logits_to_keep"] = 1
    generate_kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # never stop early at an EOS
        "do_sample": False,
        "num_beams": 1,
        "use_cache": True,
        "pad_token_id": pad_id,
        # model generation configs may carry sampling defaults; greedy ignores them, say so explicitly
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches: dict[str, dict[str, Any]] = {}
    try:
        with torch.inference_mode():
            for batch in batch_sizes:
                ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
                mask = torch.ones_like(ids)

                def prefill() -> Any:
                    return model(input_ids=ids, attention_mask=mask, **prefill_kwargs)

                def generate() -> torch.Tensor:
                    out = model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
                    if out.shape[1] != prompt_len + new_tokens:
                        raise GhostedError(
                            f"generate returned {out.shape[1] - prompt_len} new tokens instead of {new_tokens}"
                        )
                    return out

                with _peak_memory(device, memory_method) as memory:
                    prefill()  # warm-up (also the peak-memory sample)
                    generate()
                prefill_ms, prefill_all = _median_ms(prefill, device, repeats)
                generate_ms, generate_all = _median_ms(generate, device, repeats)
                # generate = prefill (which yields the first token) + (new_tokens - 1) decode steps
                decode_ms = max(generate_ms - prefill_ms, 1e-6)
                batches[str(batch)] = {
                    "batch_size": batch,
                    "prefill_ms": prefill_ms,
                    "prefill_ms_all": prefill_all,
                    "prefill_tokens_per_s": batch * prompt_len / (prefill_ms / 1e3),
                    "generate_ms": generate_ms,
                    "generate_ms_all": generate_all,
                    "generate_tokens_per_s": batch * new_tokens / (generate_ms / 1e3),
                    "decode_ms_per_token": decode_ms / (new_tokens - 1),
                    "decode_tokens_per_s": batch * (new_tokens - 1) / (decode_ms / 1e3),
                    **memory,
                }
    finally:
        model.train(was_training)

    total_params = sum(p.numel() for p in model.parameters())
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "params": total_params,
        "params_non_embedding": total_params - _embedding_params(model),
        "weights_bytes": _weights_bytes(model),
        "checkpoint_bytes": checkpoint_bytes(checkpoint_dir) if checkpoint_dir is not None else None,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "seed": seed,
        "memory_method": memory_method,
        "batches": batches,
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def efficiency_ratios(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, Any]:
    """Pruned vs dense: speed-ups (> 1 is faster) and size/memory ratios (< 1 is smaller), per shared batch size."""
    sizes = ("params", "params_non_embedding", "weights_bytes", "checkpoint_bytes")
    out: dict[str, Any] = {f"{key}_ratio": _ratio(pruned.get(key), dense.get(key)) for key in sizes}
    batches: dict[str, dict[str, float | None]] = {}
    for key, d in dense.get("batches", {}).items():
        p = pruned.get("batches", {}).get(key)
        if p is None:
            continue
        batches[key] = {
            "prefill_speedup": _ratio(d["prefill_ms"], p["prefill_ms"]),
            "generate_speedup": _ratio(d["generate_ms"], p["generate_ms"]),
            "decode_speedup": _ratio(p["decode_tokens_per_s"], d["decode_tokens_per_s"]),
            "peak_memory_ratio": _ratio(p.get("peak_memory_bytes"), d.get("peak_memory_bytes")),
            "peak_memory_delta_ratio": _ratio(p.get("peak_memory_delta_bytes"), d.get("peak_memory_delta_bytes")),
        }
    out["batches"] = batches
    return out
