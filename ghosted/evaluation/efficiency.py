"""Size, latency, throughput and peak memory of a causal LM, dense or pruned, on CPU or CUDA.

Inputs are random token ids from a seeded generator, so no tokenizer or data is needed.
Timings: one warm-up, then the median of `repeats` runs (evaluate/harness.timed, synchronized on CUDA).
Peak memory per batch size, over one prefill and one generate call (evaluate/harness.peak_memory): the
CUDA allocator's peak, or on Linux CPUs the process's peak resident set size, each with its rise over
what was in use before; compare CPU numbers only between models each measured in a fresh process.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ghosted.errors import GhostedError
from ghosted.evaluation.harness import memory_method, peak_memory, timed

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


def _check_args(batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, repeats: int) -> None:
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise GhostedError(f"batch_sizes must be whole numbers >= 1, got {batch_sizes!r}")
    for name, value, low in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise GhostedError(f"{name} must be a whole number >= {low}, got {value!r}")


def _where(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The device the model lives on; `device`, if given, must be it."""
    model_device = _model_device(model)
    device = torch.device(device) if device is not None else model_device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device != model_device:
        raise GhostedError(f"the model is on {model_device} but device={device}; move it first with model.to('{device}')")
    return device


def _vocab(model: torch.nn.Module, tokenizer: Any, positions_needed: int) -> int:
    """How many token ids the random prompts draw from; checks the prompt fits the model's positions."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer)) if vocab else len(tokenizer)
    if vocab < 1:
        raise GhostedError("cannot tell the vocabulary size: the model has no config.vocab_size; pass its tokenizer")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and positions_needed > max_positions:
        raise GhostedError(
            f"prompt_len + new_tokens = {positions_needed} exceeds the model's "
            f"max_position_embeddings {max_positions}; lower prompt_len or new_tokens"
        )
    return vocab


def _pad_id(model: torch.nn.Module, tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(pad_id, list):
        pad_id = pad_id[0] if pad_id else None
    return 0 if pad_id is None else int(pad_id)


def _call_kwargs(model: torch.nn.Module, tokenizer: Any, new_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments of the prefill forward and of greedy generate."""
    # logits for the last position only, as generate's prefill does (when the forward takes it)
    prefill: dict[str, Any] = {"use_cache": True}
    if _accepts(model, "logits_to_keep"):
        prefill["logits_to_keep"] = 1
    generate: dict[str, Any] = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # never stop early at an EOS
        "do_sample": False,
        "num_beams": 1,
        "use_cache": True,
        "pad_token_id": _pad_id(model, tokenizer),
        # model generation configs may carry sampling defaults; greedy ignores them, say so explicitly
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }
    return prefill, generate


def _measure_batch(model: torch.nn.Module, ids: torch.Tensor, prefill_kwargs: dict[str, Any],
                   generate_kwargs: dict[str, Any], device: torch.device, method: str, repeats: int) -> dict[str, Any]:
    """Prefill latency, generate/decode throughput and peak memory of one batch of prompts [B, T]."""
    batch, prompt_len = ids.shape
    new_tokens = generate_kwargs["max_new_tokens"]
    mask = torch.ones_like(ids)

    def prefill() -> Any:
        return model(input_ids=ids, attention_mask=mask, **prefill_kwargs)

    def generate() -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        if out.shape[1] != prompt_len + new_tokens:
            raise GhostedError(f"generate returned {out.shape[1] - prompt_len} new tokens instead of {new_tokens}")
        return out

    with peak_memory(device, method) as memory:
        prefill()  # warm-up (also the peak-memory sample)
        generate()
    prefill_ms, prefill_all = timed(prefill, device, repeats)
    generate_ms, generate_all = timed(generate, device, repeats)
    # generate = prefill (which yields the first token) + (new_tokens - 1) decode steps
    decode_ms = max(generate_ms - prefill_ms, 1e-6)
    return {
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


def _model_facts(model: torch.nn.Module, device: torch.device, checkpoint_dir: Path | None) -> dict[str, Any]:
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "num_layers": getattr(getattr(model, "config", None), "num_hidden_layers", None),
        "params": total_params,
        "params_non_embedding": total_params - _embedding_params(model),
        "weights_bytes": _weights_bytes(model),
        "checkpoint_bytes": checkpoint_bytes(checkpoint_dir) if checkpoint_dir is not None else None,
    }


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
    _check_args(batch_sizes, prompt_len, new_tokens, repeats)
    device = _where(model, device)
    vocab = _vocab(model, tokenizer, prompt_len + new_tokens)
    method = memory_method(device)
    prefill_kwargs, generate_kwargs = _call_kwargs(model, tokenizer, new_tokens)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    batches: dict[str, dict[str, Any]] = {}
    try:
        with torch.inference_mode():
            for batch in batch_sizes:
                ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
                batches[str(batch)] = _measure_batch(model, ids, prefill_kwargs, generate_kwargs, device, method,
                                                     repeats)
    finally:
        model.train(was_training)
    return {**_model_facts(model, device, checkpoint_dir), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "seed": seed, "memory_method": method, "batches": batches}


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
