"""The traversal contract (CaptureJob in, the accumulator fed), the owner of a pass's hooks, and the whole-model
traversal: batch by batch through the model where it lives, states taken by forward pre-hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ghosted.calibration.accumulator import Accumulator
from ghosted.errors import GhostedError
from ghosted.memory import release_memory
from ghosted.method import arch


@dataclass(frozen=True)
class CaptureJob:
    """What a traversal runs over: the model, the calibration windows and what to take from them."""

    model: torch.nn.Module
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    needed: set[int]  # boundary states hidden_states[i] to capture
    mlp_layers: set[int]  # layers whose MLP output to capture
    batch_size: int
    device: torch.device
    progress: bool
    desc: str
    offload_budget: int | None  # layerwise: bytes of carried states kept in memory (None: the default)


# A traversal feeds every calibration batch's states to the accumulator; returns the most bytes it offloaded.
Traversal = Callable[[CaptureJob, Accumulator], int]


class StopForward(Exception):
    """Raised inside a hook once every needed state is captured: skips the remaining layers and the LM head."""


class Hooks:
    """Owns the hooks of one pass: added through it, all removed on exit (also when a forward stops or fails)."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: torch.nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: torch.nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def mlp_output_hook(store: dict[int, torch.Tensor], i: int) -> Callable:
    """A forward hook that keeps the output of layer i's MLP in store[i]."""
    def hook(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        store[i] = out.detach()
    return hook


def whole_model(job: CaptureJob, acc: Accumulator) -> int:
    """Batch by batch through the whole model where it lives; the forward stops right after the deepest state."""
    model = job.model
    home = next(model.parameters()).device
    if job.device != home:
        raise GhostedError(f"the model is on {home}; capture on {job.device} needs layerwise=True")
    layers = arch.get_layers(model)
    spec = arch.get_arch(model)
    L = len(layers)
    needed = job.needed
    deepest = max(needed)
    states: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}

    def make_pre(i: int):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i in needed:
                states[i] = h.detach()
            if i == deepest:
                raise StopForward
        return hook

    try:
        with Hooks() as hooks:
            for i in range(L):
                if i <= deepest:
                    hooks.pre(layers[i], make_pre(i))
            if deepest == L:
                hooks.pre(arch.get_final_norm(model), make_pre(L))
            for i in job.mlp_layers:
                hooks.post(arch.layer_submodule(layers[i], spec.mlp), mlp_output_hook(mlp_out, i))
            _forward_batches(job, acc, states, mlp_out)
    finally:
        states.clear()
        mlp_out.clear()
    return 0


def _forward_batches(job: CaptureJob, acc: Accumulator, states: dict[int, torch.Tensor],
                     mlp_out: dict[int, torch.Tensor]) -> None:
    """One forward per batch; the hooks fill `states` and `mlp_out`, which go to the accumulator and are freed."""
    N = job.input_ids.shape[0]
    bar = tqdm(total=N, desc=job.desc, unit="seq", disable=not job.progress)
    for start in range(0, N, job.batch_size):
        ids = job.input_ids[start:start + job.batch_size].to(job.device)
        am = job.attention_mask[start:start + job.batch_size].to(job.device)
        states.clear()
        mlp_out.clear()
        try:
            job.model(input_ids=ids, attention_mask=am, use_cache=False)
        except StopForward:
            pass
        missing = job.needed - set(states)
        if missing:
            raise GhostedError(f"capture did not see hidden states {sorted(missing)}: unsupported layer layout")
        acc.add(states, mlp_out, ids, am, start)
        states.clear()
        mlp_out.clear()
        # the batch's states are freed; hand glibc's free pages back, or the holes they leave between
        # longer-lived blocks add up over the batches (the peak grew with the calibration size without it)
        release_memory(collect=False)
        bar.update(ids.shape[0])
    bar.close()
