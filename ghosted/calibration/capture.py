"""Run the dense model over calibration windows once and stream what the solvers and scores need.

Indexing, documented once for the whole project:
    hidden_states[i] is the INPUT of decoder layer i (0-based); hidden_states[0] is the
    embedding output; hidden_states[L] is the output of the last layer BEFORE the final norm.
    A cut (s, s+k) removes layers s .. s+k-1: X = hidden_states[s], Y = hidden_states[s+k].

States are taken with forward pre-hooks on the decoder layers and on the final norm, so the
final norm never leaks into a score. The forward pass is stopped (by an exception raised in
a hook) right after the deepest state a plan needs, which skips the remaining layers and the
LM head. Sums are float64 on the model's device; activations are never kept across batches.

The plan and result types live in plan.py, the accumulator in accumulator.py, and the traversals
(whole-model in passes.py, layer by layer in layerwise.py) are chosen by name from TRAVERSALS.
"""

from __future__ import annotations

import time

import torch

from ghosted.calibration.accumulator import Accumulator
from ghosted.calibration.layerwise import layerwise as _layerwise
from ghosted.calibration.passes import CaptureJob, Traversal, whole_model
from ghosted.calibration.plan import CapturePlan, CaptureResult, mlp_layers, needed_states, validate_pairs
from ghosted.method import arch
from ghosted.method.catalog import Registry
from ghosted.method.policies import TokenPolicy, get_policy

__all__ = ["CAPTURE_STATE_BUDGET", "TRAVERSALS", "CapturePlan", "CaptureResult", "capture", "capture_batch"]

TRAVERSALS: Registry[Traversal] = Registry("capture traversal")
TRAVERSALS.register("whole-model")(whole_model)
TRAVERSALS.register("layerwise")(_layerwise)

# The boundary states one capture forward holds at once: a batch is cut to fewer windows (never under one)
# when its states, len(needed) * B * T * d * bytes, would be more than this. On a CPU a forward over one
# long window is about as fast per token as over several, so the smaller batch costs little time.
CAPTURE_STATE_BUDGET = 64 * 2**20


def capture_batch(batch_size: int, n_states: int, seq_len: int, d: int, element_size: int,
                  budget: int | None = None) -> int:
    """Windows per capture forward: batch_size, or as many as keep n_states boundary states of that many
    windows within `budget` bytes (default CAPTURE_STATE_BUDGET), and at least one."""
    budget = CAPTURE_STATE_BUDGET if budget is None else budget
    per_window = max(1, n_states * seq_len * d * element_size)
    return max(1, min(int(batch_size), budget // per_window))


@torch.no_grad()
def capture(model: torch.nn.Module, input_ids: torch.Tensor, plan: CapturePlan, policy: TokenPolicy | str = "sink",
            attention_mask: torch.Tensor | None = None, batch_size: int = 4, bos_id: int | None = None,
            progress: bool = True, desc: str = "calibration pass", layerwise: bool = False,
            device: str | torch.device | None = None, offload_budget: int | None = None) -> CaptureResult:
    """One streaming pass of the dense model over input_ids [N, T].

    layerwise=False: batch by batch through the whole model where it lives.
    layerwise=True: layer by layer; each decoder layer is moved to `device` (default: where the model
    lives), run on every calibration batch, and moved back, carrying the calibration hidden states
    forward, so the device holds one layer plus the states (for models larger than the device). Both
    paths feed the same accumulator and give the same sums. A forward takes batch_size windows, or fewer
    (capture_batch) when their boundary states would exceed CAPTURE_STATE_BUDGET. The states the layer-major pass carries
    (N x T x d per parked layer) stay in memory up to offload_budget bytes (default
    DEFAULT_OFFLOAD_BUDGET), beyond it in files of a temporary folder that is removed afterwards.
    """
    t0 = time.perf_counter()
    L = arch.num_layers(model)
    validate_pairs(plan.pairs, L)
    needed = needed_states(plan, L)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    d = model.config.hidden_size  # GPT-2's n_embd too: transformers maps hidden_size onto it
    policy = get_policy(policy)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch_size = capture_batch(batch_size, len(needed), input_ids.shape[1], d,
                               next(model.parameters()).element_size())
    acc = Accumulator(plan, policy, L, d, device, bos_id)
    job = CaptureJob(model, input_ids, attention_mask, needed, mlp_layers(plan), batch_size, device, progress, desc,
                     offload_budget)
    offloaded = TRAVERSALS.get("layerwise" if layerwise else "whole-model")(job, acc)
    out = acc.result(time.perf_counter() - t0)
    out.offloaded_bytes = offloaded
    return out
