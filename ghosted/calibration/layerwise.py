"""The layer-major traversal, for models larger than the device: each decoder layer is moved to the capture
device, run on every calibration batch and moved back, carrying the batches' hidden states forward in an
offload store. It feeds the accumulator the same states as the whole-model pass, so the sums are the same."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ghosted.calibration.accumulator import Accumulator
from ghosted.calibration.offload import DEFAULT_OFFLOAD_BUDGET, OffloadStore
from ghosted.calibration.passes import CaptureJob, Hooks, StopForward, mlp_output_hook
from ghosted.memory import release_memory
from ghosted.method import arch


def layerwise(job: CaptureJob, acc: Accumulator) -> int:
    """Layer-major capture. A recording pass (decoder layers replaced by recorders that return their input)
    collects, per batch, each layer's call arguments (masks, rotary embeddings: they may differ per layer,
    e.g. Gemma 3's sliding and global layers) at the cost of the embeddings. Then layer i is moved to
    `device`, applied to every batch's carried state, and moved back. States a cut or score still needs
    later wait on the layer's home device (host memory), not on `device`. Returns the most bytes offloaded."""
    park = OffloadStore(DEFAULT_OFFLOAD_BUDGET if job.offload_budget is None else int(job.offload_budget))
    try:
        layers = arch.get_layers(job.model)
        home = next(job.model.parameters()).device
        deepest = max(job.needed)
        batches = _record_batches(job, layers, home, deepest)
        waiting, mlp_wait = _run_layers(job, layers, batches, park, home, deepest)
        _feed(job, acc, batches, waiting, mlp_wait, park)
    finally:
        park.close()
    return park.spilled_bytes


def _to(obj, device: torch.device):
    """Move every tensor inside args/kwargs (tuples, lists, dicts) to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer i during the recording pass: keeps its inputs, returns h unchanged."""

    def __init__(self, layer: torch.nn.Module, i: int, book: dict, last: int, tuple_len: int) -> None:
        super().__init__()
        self.layer = layer  # attributes the model's loop may read (e.g. attention_type) stay reachable
        self.i, self.book, self.last, self.tuple_len = i, book, last, tuple_len

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        rest = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.book[self.i] = (h.detach(), rest, kw)
        if self.i == self.last:
            raise StopForward
        return h if self.tuple_len == 0 else (h,) + (None,) * (self.tuple_len - 1)


def _record_batches(job: CaptureJob, layers: torch.nn.ModuleList, home: torch.device, deepest: int) -> list:
    """Recording pass, batch by batch: per batch (start, ids, am, {layer i: (h_in, args, kwargs)}). A first call
    that stops at layer 0 and one real call of layer 0 tell the recorders whether a decoder layer returns a
    tensor or a tuple."""
    originals = list(layers)

    def record(ids: torch.Tensor, am: torch.Tensor, last: int, tuple_len: int) -> dict[int, tuple]:
        book: dict[int, tuple] = {}
        try:
            for i in range(last + 1):
                layers[i] = _Recorder(originals[i], i, book, last, tuple_len)
            try:
                job.model(input_ids=ids, attention_mask=am, use_cache=False)
            except StopForward:
                pass
        finally:
            for i in range(last + 1):
                layers[i] = originals[i]
        return book

    batch_size = job.batch_size
    first = record(job.input_ids[:batch_size].to(home), job.attention_mask[:batch_size].to(home), 0, 0)
    h0, a0, k0 = first[0]
    probe = originals[0](h0, *a0, **k0)
    tuple_len = len(probe) if isinstance(probe, tuple) else 0
    del probe, first
    batches = []
    for start in range(0, job.input_ids.shape[0], batch_size):
        ids = job.input_ids[start:start + batch_size].to(home)
        am = job.attention_mask[start:start + batch_size].to(home)
        batches.append((start, ids, am, record(ids, am, max(deepest - 1, 0), tuple_len)))
    return batches


def _run_layers(job: CaptureJob, layers: torch.nn.ModuleList, batches: list, park: OffloadStore,
                home: torch.device, deepest: int) -> tuple[dict[int, dict[int, object]], dict[int, dict[int, object]]]:
    """Layer-major pass: returns, per batch, the parked states {i: state} and MLP outputs the accumulator needs.
    The books drop the embedding output once it is carried (it is the same tensor for every layer's entry),
    so only `park` holds per-token states across batches."""
    device = job.device
    spec = arch.get_arch(job.model)
    carried = {}
    for b, (_, _, _, book) in enumerate(batches):
        carried[b] = park.put(book[0][0].to(device))
        for i in book:
            book[i] = (None,) + book[i][1:]
    waiting: dict[int, dict[int, object]] = {b: {} for b in carried}  # states kept for later cuts
    mlp_wait: dict[int, dict[int, object]] = {b: {} for b in carried}
    bar = tqdm(total=deepest, desc=f"{job.desc} (layer by layer)", unit="layer", disable=not job.progress)
    for i in range(deepest + 1):
        if i in job.needed:  # state i of every batch is current: park it for later pairs (or finish at deepest)
            for b in carried:
                waiting[b][i] = carried[b] if i == deepest else park.put(park.get(carried[b]).to(home, copy=True))
        if i == deepest:
            break
        layer = layers[i]
        layer.to(device)
        current = {}
        try:
            with Hooks() as hooks:
                if i in job.mlp_layers:
                    hooks.post(arch.layer_submodule(layer, spec.mlp), mlp_output_hook(current, i))
                for b, (_, _, _, book) in enumerate(batches):
                    _, args, kwargs = book[i]
                    out = layer(park.get(carried[b], device), *_to(args, device), **_to(kwargs, device))
                    park.drop(carried[b])
                    carried[b] = park.put((out[0] if isinstance(out, tuple) else out).detach())
                    del out
                    if i in current:
                        mlp_wait[b][i] = park.put(current.pop(i).to(home))
        finally:
            if device != home:
                layer.to(home)
        release_memory(collect=False)  # the layer's freed activations (as after every batch of the other path)
        bar.update(1)
    bar.close()
    return waiting, mlp_wait


def _feed(job: CaptureJob, acc: Accumulator, batches: list, waiting: dict[int, dict[int, object]],
          mlp_wait: dict[int, dict[int, object]], park: OffloadStore) -> None:
    """Give every batch's parked states to the accumulator, in batch order, dropping them as they go."""
    device = job.device
    for b, (start, ids, am, _) in enumerate(batches):
        states = {i: park.get(h, device) for i, h in waiting[b].items()}
        mlp = {i: park.get(h) for i, h in mlp_wait[b].items()}
        for h in list(waiting[b].values()) + list(mlp_wait[b].values()):
            park.drop(h)
        acc.add(states, mlp, ids.to(device), am.to(device), start)
        waiting[b].clear()
        mlp_wait[b].clear()
        del states, mlp
        release_memory(collect=False)

