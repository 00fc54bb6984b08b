"""Run the dense model over calibration windows once and stream what the solvers and scores need.

Indexing, documented once for the whole project:
    hidden_states[i] is the INPUT of decoder layer i (0-based); hidden_states[0] is the
    embedding output; hidden_states[L] is the output of the last layer BEFORE the final norm.
    A cut (s, s+k) removes layers s .. s+k-1: X = hidden_states[s], Y = hidden_states[s+k].

States are taken with forward pre-hooks on the decoder layers and on the final norm, so the
final norm never leaks into a score. The forward pass is stopped (by an exception raised in
a hook) right after the deepest state a plan needs, which skips the remaining layers and the
LM head. Sums are float64 on the model's device; activations are never kept across batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ghosted._remote.modeling_ghosted import previous_states, scale_free
from ghosted.errors import GhostedError
from ghosted.io import (
    file_sha256,  # noqa: F401  re-exported: capture.file_sha256
    release_memory,
)
from ghosted.method import arch
from ghosted.method.linalg import F64, GramStore, PairSums, orthonormal_mixer
from ghosted.method.policies import TokenPolicy, get_policy

Pair = tuple[int, int]


@dataclass
class CapturePlan:
    pairs: list[Pair] = field(default_factory=list)  # cuts whose sums are accumulated
    full: bool = True  # X^T X and X^T Y (ghost, scalar, low-rank, ghost-aware selection)
    hadamard: bool = False  # rotated magnitude sums (LinearPatch rotate)
    mlp: bool = False  # MLP output of layer s-1 (ReplaceMe)
    scores: bool = False  # cosine / angular tables over all boundary pairs
    heldout: frozenset[int] = frozenset()  # window indices whose sums go to the held-out group
    # (metric, k, m): keep the sums of only the m blocks of length k that the score `metric` (angular |
    # cosine) ranks best after the first forward (capture_batch windows); the others' sums are never
    # accumulated (needs scores=True)
    shortlist: tuple[str, int, int] | None = None
    norm: bool = False  # with full: also the norm-feature sums (N = n(X)) of every cut (ghost --norm-features)
    shift: bool = False  # with norm: N = [n(X), the previous token's n(X)] (ghost --token-shift)


@dataclass
class CaptureResult:
    num_layers: int
    fit: dict[Pair, PairSums]  # tokens the policy keeps, fit windows
    heldout: dict[Pair, PairSums]  # tokens the policy keeps, held-out windows
    cos_sum: torch.Tensor | None  # [L+1, L+1] sum over tokens of cos(h_i, h_j)
    ang_sum: torch.Tensor | None  # [L+1, L+1] sum over tokens of arccos(cos)/pi
    score_tokens: int
    seconds: float = 0.0
    fit_left_out: dict[Pair, PairSums] = field(default_factory=dict)  # tokens the policy left out
    heldout_left_out: dict[Pair, PairSums] = field(default_factory=dict)
    offloaded_bytes: int = 0  # layerwise: the most bytes of states that were in offload files at once

    def sums(self, pair: Pair, group: str = "total", combine: str = "kept") -> PairSums:
        """Sums of one cut over windows `group` (fit | heldout | total), combined as a token policy declares:
        kept (the tokens the capture policy kept), all (kept + left out), anchor (kept, plus the
        left-out tokens with target = their own state, pinning the operator to identity on them).
        For all/anchor the relative ridge still refers to the kept tokens' trace."""
        groups = {"fit": [(self.fit, self.fit_left_out)], "heldout": [(self.heldout, self.heldout_left_out)],
                  "total": [(self.fit, self.fit_left_out), (self.heldout, self.heldout_left_out)]}[group]
        if combine not in ("kept", "all", "anchor"):
            raise ValueError(f"combine must be kept, all or anchor, got {combine}")
        kept = _add([g[pair] for g, _ in groups])
        if combine == "kept":
            return kept
        if pair not in self.fit_left_out:
            raise GhostedError("these sums were captured without the left-out tokens (use token policy auto)")
        left = _add([lo[pair] for _, lo in groups])
        if left.n == 0:
            return kept
        if kept.gram is not None and left.gram is None:
            raise GhostedError(f"a '{combine}' fit needs the left-out tokens' full sums: capture with token policy auto")
        out = kept + (left if combine == "all" else left.as_identity_targets())
        out.trace_ref = None if kept.gram is None else float(torch.trace(kept.gram))
        return out

    def left_out(self, pair: Pair, group: str = "total") -> PairSums | None:
        """Sums of the tokens the policy left out of the fit (None when the capture did not keep them)."""
        if pair not in self.fit_left_out:
            return None
        parts = {"fit": [self.fit_left_out], "heldout": [self.heldout_left_out],
                 "total": [self.fit_left_out, self.heldout_left_out]}[group]
        return _add([g[pair] for g in parts])

    def total(self, pair: Pair) -> PairSums:
        """Fit + held-out sums: the final operator uses every kept token."""
        return self.sums(pair, "total")

    def mean_cos(self) -> torch.Tensor:
        return self.cos_sum / max(self.score_tokens, 1)

    def mean_angular(self) -> torch.Tensor:
        return self.ang_sum / max(self.score_tokens, 1)

    def save(self, path: str | Path) -> str:
        """Write every sum to one safetensors file (small JSON metadata in its header), atomically; returns
        the file's sha256. No pickle: loading it back cannot run code."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        groups: dict[str, dict[str, dict]] = {}
        for group in _GROUPS:
            groups[group] = {}
            for (s, b), ps in getattr(self, group).items():
                key = f"{s}-{b}"
                groups[group][key] = {"d": ps.d, "n": ps.n, "trace_ref": ps.trace_ref}
                for f in dataclasses.fields(ps):
                    t = getattr(ps, f.name)
                    if isinstance(t, torch.Tensor):
                        tensors[f"{group}/{key}/{f.name}"] = t.detach().to("cpu").contiguous().clone()  # shared grams: own copies
        for name in ("cos_sum", "ang_sum"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().to("cpu").contiguous()
        meta = {"format": _FORMAT, "num_layers": self.num_layers, "score_tokens": self.score_tokens,
                "seconds": self.seconds, "groups": groups}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"ghosted_capture": json.dumps(meta)})
            digest = file_sha256(tmp)
            os.replace(tmp, path)  # a half-written file never carries the final name
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None, device: str | torch.device = "cpu") -> CaptureResult:
        """Read a file written by save(). With `sha256`, refuse a file whose hash differs from it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise GhostedError(f"{path}: no such capture file")
        if sha256 is not None and file_sha256(path) != sha256:
            raise GhostedError(f"{path}: sha256 does not match the one recorded when it was written")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = json.loads((f.metadata() or {}).get("ghosted_capture", "null"))
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                    raise GhostedError(f"{path} is not a capture written by CaptureResult.save")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as exc:  # a damaged or foreign file
            raise GhostedError(f"{path}: unreadable capture file ({exc})") from exc
        groups: dict[str, dict[Pair, PairSums]] = {}
        for group in _GROUPS:
            groups[group] = {}
            for key, info in meta["groups"][group].items():
                s, b = (int(x) for x in key.split("-"))
                ps = PairSums(int(info["d"]), int(info["n"]), trace_ref=info["trace_ref"])
                for f in dataclasses.fields(ps):
                    t = tensors.get(f"{group}/{key}/{f.name}")
                    if t is not None:
                        setattr(ps, f.name, t)
                groups[group][(s, b)] = ps
        return cls(int(meta["num_layers"]), groups["fit"], groups["heldout"], tensors.get("cos_sum"),
                   tensors.get("ang_sum"), int(meta["score_tokens"]), float(meta["seconds"]), groups["fit_left_out"],
                   groups["heldout_left_out"])


_FORMAT = "ghosted-capture/1"
_GROUPS = ("fit", "heldout", "fit_left_out", "heldout_left_out")



def _add(parts: list[PairSums]) -> PairSums:
    nonempty = [p for p in parts if p.n]
    if not nonempty:
        return parts[0]
    out = nonempty[0]
    for p in nonempty[1:]:
        out = out + p
    return out


class _Stop(Exception):
    """Raised inside a hook once every needed state is captured."""


def validate_pairs(pairs: list[Pair], num_layers: int) -> None:
    for s, b in pairs:
        if not (0 <= s < b <= num_layers):
            raise GhostedError(f"cut ({s}, {b}) is outside the model's {num_layers} layers")


def _shift_features(X: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """[B, T, 2d] float64: n(X) and the previous token's n(X) as a token-shift ghost reads it at inference, with
    the position ids transformers derives from the attention mask."""
    N = scale_free(X.to(F64))
    pid = (am.long().cumsum(-1) - 1).clamp_min(0)
    return torch.cat([N, previous_states(N, pid)], -1)


class _Sums:
    """Everything one capture accumulates; fed one batch of states at a time (either capture path)."""

    def __init__(self, plan: CapturePlan, policy: TokenPolicy, L: int, d: int, device: torch.device,
                 bos_id: int | None) -> None:
        self.plan, self.policy, self.L, self.bos_id = plan, policy, L, bos_id
        self.H = orthonormal_mixer(d).to(device) if plan.hadamard else None
        self.fit: dict[Pair, PairSums] = {p: PairSums(d) for p in plan.pairs}
        self.held: dict[Pair, PairSums] = {p: PairSums(d) for p in plan.pairs}
        self.keep_left_out = policy.left_out != "none"
        # "auto" and "anchor" fit with the left-out tokens too (full sums); "sink" only needs their mean move
        self.full_left_out = policy.left_out == "full"
        self.fit_lo = {p: PairSums(d) for p in plan.pairs} if self.keep_left_out else {}
        self.held_lo = {p: PairSums(d) for p in plan.pairs} if self.keep_left_out else {}
        self.cos_sum = torch.zeros(L + 1, L + 1, dtype=F64, device=device) if plan.scores else None
        self.ang_sum = torch.zeros(L + 1, L + 1, dtype=F64, device=device) if plan.scores else None
        self.score_tokens = 0
        self.grams = GramStore()  # X^T X per (group, start boundary), shared by the cuts that start there
        self.active: list[Pair] | None = None if plan.shortlist is not None else list(plan.pairs)

    def add(self, states: dict[int, torch.Tensor], mlp_out: dict[int, torch.Tensor], ids: torch.Tensor,
            am: torch.Tensor, start: int) -> None:
        """One batch: states[i] = hidden_states[i] [B, T, d]; rows start .. start+B-1 of the calibration set."""
        device = ids.device
        states = {i: h.to(device) for i, h in states.items()}
        for i in sorted(states):  # an fp16 overflow must stop here, not poison the float64 sums
            if not torch.isfinite(states[i]).all():
                raise GhostedError(f"non-finite activations at the input of layer {i} in {states[i].dtype} "
                                   f"(windows {start}-{start + ids.shape[0] - 1}): load the model with "
                                   "--dtype bfloat16 or float32")
        plan = self.plan
        base = self.policy.base_mask(ids, am, self.bos_id)
        rows = range(start, start + ids.shape[0])
        is_held = torch.tensor([r in plan.heldout for r in rows], device=device)[:, None]
        if plan.scores:  # first: a shortlist is ranked on the scores of the windows seen so far, this one included
            self.score_tokens += _accumulate_scores(states, base, self.L, self.cos_sum, self.ang_sum)
        if self.active is None:
            self.active = self._shortlist()
        by_start: dict[int, list[int]] = {}
        for s, b in self.active:
            by_start.setdefault(s, []).append(b)
        for s, ends in by_start.items():
            X = states[s]
            m = base
            # the token shift's features need each token's predecessor: computed on whole windows, then selected
            feats = _shift_features(X, am) if plan.full and plan.norm and plan.shift else None
            Mlp = mlp_out[s - 1].to(device) if plan.mlp and s >= 1 else None
            groups = [(self.fit, m & ~is_held), (self.held, m & is_held)]
            if self.keep_left_out:
                lo = am.bool() & ~m
                groups += [(self.fit_lo, lo & ~is_held), (self.held_lo, lo & is_held)]
            for j, (group, gm) in enumerate(groups):
                if not gm.any():
                    continue
                whole = j < 2 or self.full_left_out
                full = plan.full and whole
                Xg = X[gm]
                gram = self.grams.add((j, s), Xg) if full else None
                norm = full and plan.norm
                norm_gram, xn, Ng = self.grams.add_norm((j, s), Xg, None if feats is None else feats[gm]) \
                    if norm else (None, None, None)
                for b in ends:
                    ps = group[(s, b)]
                    ps.add(Xg, states[b][gm], full=full, hadamard=self.H if whole else None,
                           mlp=None if Mlp is None or not whole else Mlp[gm], gram=False, norm=norm, N=Ng)
                    if gram is not None:
                        ps.gram = gram
                    if norm:
                        ps.norm_gram, ps.xn = norm_gram, xn

    def _shortlist(self) -> list[Pair]:
        """The plan's shortlist: the m best blocks of length k by the running score tables."""
        metric, k, m = self.plan.shortlist
        if self.cos_sum is None or metric not in ("angular", "cosine"):
            raise ValueError("a capture shortlist needs the score tables and metric angular or cosine")
        blocks = [(s, b) for s, b in self.plan.pairs if b - s == k]
        table = self.ang_sum if metric == "angular" else -self.cos_sum  # lower is better for both
        return sorted(sorted(blocks, key=lambda p: (float(table[p]), p[0]))[:m])

    def result(self, seconds: float) -> CaptureResult:
        keep = set(self.active if self.active is not None else self.plan.pairs)

        def only(sums: dict[Pair, PairSums]) -> dict[Pair, PairSums]:
            return {p: v for p, v in sums.items() if p in keep}

        return CaptureResult(self.L, only(self.fit), only(self.held), self.cos_sum, self.ang_sum, self.score_tokens,
                             seconds, only(self.fit_lo), only(self.held_lo))


# The boundary states one capture forward holds at once: a batch is cut to fewer windows (never under one)
# when its states, len(needed) * B * T * d * bytes, would be more than this. On a CPU a forward over one
# 512-token window is as fast per token as over four; the states of four were 146 MiB for SmolLM2 (L = 30).
CAPTURE_STATE_BUDGET = 64 * 2**20


def capture_batch(batch_size: int, n_states: int, seq_len: int, d: int, element_size: int,
                  budget: int | None = None) -> int:
    """Windows per capture forward: batch_size, or as many as keep n_states boundary states of that many
    windows within `budget` bytes (default CAPTURE_STATE_BUDGET), and at least one."""
    budget = CAPTURE_STATE_BUDGET if budget is None else budget
    per_window = max(1, n_states * seq_len * d * element_size)
    return max(1, min(int(batch_size), budget // per_window))


def _needed(plan: CapturePlan, L: int) -> set[int]:
    needed: set[int] = set()
    for s, b in plan.pairs:
        needed |= {s, b}
    if plan.scores:
        needed |= set(range(L + 1))
    if not needed:
        raise GhostedError("nothing to capture: no cut and no scores requested")
    return needed


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
    import time

    t0 = time.perf_counter()
    L = arch.num_layers(model)
    validate_pairs(plan.pairs, L)
    needed = _needed(plan, L)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    d = model.config.hidden_size  # GPT-2's n_embd too: transformers maps hidden_size onto it
    policy = get_policy(policy)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch_size = capture_batch(batch_size, len(needed), input_ids.shape[1], d,
                               next(model.parameters()).element_size())
    sums = _Sums(plan, policy, L, d, device, bos_id)
    if layerwise:
        park = _Parking(DEFAULT_OFFLOAD_BUDGET if offload_budget is None else int(offload_budget))
        try:
            _capture_layerwise(model, input_ids, attention_mask, plan, sums, needed, batch_size, device, progress,
                               desc, park)
        finally:
            park.close()
        out = sums.result(time.perf_counter() - t0)
        out.offloaded_bytes = park.spilled_bytes
        return out
    if device != home:
        raise GhostedError(f"the model is on {home}; capture on {device} needs layerwise=True")

    layers = arch.get_layers(model)
    spec = arch.get_arch(model)
    deepest = max(needed)
    mlp_layers = {s - 1 for s, _ in plan.pairs if s >= 1} if plan.mlp else set()
    states: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}
    handles = []

    def make_pre(i: int):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if i in needed:
                states[i] = h.detach()
            if i == deepest:
                raise _Stop
        return hook

    try:
        for i in range(L):
            if i <= deepest:
                handles.append(layers[i].register_forward_pre_hook(make_pre(i), with_kwargs=True))
        if deepest == L:
            handles.append(arch.get_final_norm(model).register_forward_pre_hook(make_pre(L), with_kwargs=True))
        for i in mlp_layers:
            handles.append(arch.layer_submodule(layers[i], spec.mlp).register_forward_hook(_mlp_hook(mlp_out, i)))
        N = input_ids.shape[0]
        bar = tqdm(total=N, desc=desc, unit="seq", disable=not progress)
        for start in range(0, N, batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            am = attention_mask[start:start + batch_size].to(device)
            states.clear()
            mlp_out.clear()
            try:
                model(input_ids=ids, attention_mask=am, use_cache=False)
            except _Stop:
                pass
            missing = needed - set(states)
            if missing:
                raise GhostedError(f"capture did not see hidden states {sorted(missing)}: unsupported layer layout")
            sums.add(states, mlp_out, ids, am, start)
            states.clear()
            mlp_out.clear()
            # the batch's states are freed; hand glibc's free pages back, or the holes they leave between
            # longer-lived blocks add up over the batches (the peak grew with the calibration size without it)
            release_memory(collect=False)
            bar.update(ids.shape[0])
        bar.close()
    finally:
        for h in handles:
            h.remove()
        states.clear()
        mlp_out.clear()
    return sums.result(time.perf_counter() - t0)


def _mlp_hook(store: dict[int, torch.Tensor], i: int):
    def hook(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        store[i] = out.detach()
    return hook


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
            raise _Stop
        return h if self.tuple_len == 0 else (h,) + (None,) * (self.tuple_len - 1)


def _capture_layerwise(model, input_ids, attention_mask, plan, sums, needed, batch_size, device, progress, desc,
                       park: _Parking):
    """Layer-major capture. A recording pass (decoder layers replaced by recorders that return their input)
    collects, per batch, each layer's call arguments (masks, rotary embeddings: they may differ per layer,
    e.g. Gemma 3's sliding and global layers) at the cost of the embeddings. Then layer i is moved to
    `device`, applied to every batch's carried state, and moved back. States a cut or score still needs
    later wait on the layer's home device (host memory), not on `device`."""
    layers = arch.get_layers(model)
    spec = arch.get_arch(model)
    home = next(model.parameters()).device
    deepest = max(needed)
    N = input_ids.shape[0]
    mlp_layers = {s - 1 for s, _ in plan.pairs if s >= 1} if plan.mlp else set()

    # 1. Recording pass, batch by batch. A first call that stops at layer 0 and one real call of layer 0
    #    tell the recorders whether a decoder layer returns a tensor or a tuple.
    originals = list(layers)

    def record(ids: torch.Tensor, am: torch.Tensor, last: int, tuple_len: int) -> dict[int, tuple]:
        book: dict[int, tuple] = {}
        try:
            for i in range(last + 1):
                layers[i] = _Recorder(originals[i], i, book, last, tuple_len)
            try:
                model(input_ids=ids, attention_mask=am, use_cache=False)
            except _Stop:
                pass
        finally:
            for i in range(last + 1):
                layers[i] = originals[i]
        return book

    first = record(input_ids[:batch_size].to(home), attention_mask[:batch_size].to(home), 0, 0)
    h0, a0, k0 = first[0]
    probe = originals[0](h0, *a0, **k0)
    tuple_len = len(probe) if isinstance(probe, tuple) else 0
    del probe, first
    batches = []  # per batch: (start, ids, am, {layer i: (h_in, args, kwargs)})
    for start in range(0, N, batch_size):
        ids = input_ids[start:start + batch_size].to(home)
        am = attention_mask[start:start + batch_size].to(home)
        batches.append((start, ids, am, record(ids, am, max(deepest - 1, 0), tuple_len)))

    # 2. Layer-major pass. The books drop the embedding output once it is carried (it is the same tensor
    #    for every layer's entry), so only `park` holds per-token states across batches.
    carried = {}
    for b, (_, _, _, book) in enumerate(batches):
        carried[b] = park.put(book[0][0].to(device))
        for i in book:
            book[i] = (None,) + book[i][1:]
    waiting: dict[int, dict[int, object]] = {b: {} for b in carried}  # states kept for later cuts
    mlp_wait: dict[int, dict[int, object]] = {b: {} for b in carried}
    bar = tqdm(total=deepest, desc=f"{desc} (layer by layer)", unit="layer", disable=not progress)
    for i in range(deepest + 1):
        if i in needed:  # state i of every batch is current: park it for later pairs (or finish at deepest)
            for b in carried:
                waiting[b][i] = carried[b] if i == deepest else park.put(park.get(carried[b]).to(home, copy=True))
        if i == deepest:
            break
        layer = layers[i]
        layer.to(device)
        current = {}
        handle = None
        if i in mlp_layers:
            handle = arch.layer_submodule(layer, spec.mlp).register_forward_hook(_mlp_hook(current, i))
        try:
            for b, (_, _, _, book) in enumerate(batches):
                _, args, kwargs = book[i]
                out = layer(park.get(carried[b], device), *_to(args, device), **_to(kwargs, device))
                park.drop(carried[b])
                carried[b] = park.put((out[0] if isinstance(out, tuple) else out).detach())
                del out
                if i in current:
                    mlp_wait[b][i] = park.put(current.pop(i).to(home))
        finally:
            if handle is not None:
                handle.remove()
            if device != home:
                layer.to(home)
        release_memory(collect=False)  # the layer's freed activations (as after every batch of the other path)
        bar.update(1)
    bar.close()
    for b, (start, ids, am, _) in enumerate(batches):
        states = {i: park.get(h, device) for i, h in waiting[b].items()}
        mlp = {i: park.get(h) for i, h in mlp_wait[b].items()}
        for h in list(waiting[b].values()) + list(mlp_wait[b].values()):
            park.drop(h)
        sums.add(states, mlp, ids.to(device), am.to(device), start)
        waiting[b].clear()
        mlp_wait[b].clear()
        del states, mlp
        release_memory(collect=False)


# States the layer-major pass keeps in memory before it spills the rest to files (ghosted prune --offload-budget).
DEFAULT_OFFLOAD_BUDGET = 4 * 2**30


@dataclass
class _Spilled:
    path: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    nbytes: int


class _Parking:
    """Per-batch states the layer-major pass keeps: in memory up to `budget` bytes, beyond it each in its own
    file of a temporary folder (read back with torch.from_file when its batch comes up; close() removes the
    folder), so host memory holds about one layer's batch of states plus the sums, whatever N x T is."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.dir, self.count = budget, 0, None, 0
        self.spilled_bytes = 0  # the largest total on disk at any time (reported by the capture)
        self._on_disk = 0

    def put(self, t: torch.Tensor) -> torch.Tensor | _Spilled:
        n = t.numel() * t.element_size()
        if self.used + n <= self.budget:
            self.used += n
            return t
        import os
        import tempfile

        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="ghosted-offload-")
        self.count += 1
        path = os.path.join(self.dir, f"{self.count}.bin")
        t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)  # the raw bytes, any dtype
        self._on_disk += n
        self.spilled_bytes = max(self.spilled_bytes, self._on_disk)
        return _Spilled(path, tuple(t.shape), t.dtype, t.device, n)

    def get(self, h: torch.Tensor | _Spilled, device: torch.device | None = None) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h if device is None else h.to(device)
        raw = torch.from_file(h.path, shared=False, size=h.nbytes, dtype=torch.uint8)
        return raw.view(h.dtype).reshape(h.shape).to(device if device is not None else h.device)

    def drop(self, h: torch.Tensor | _Spilled) -> None:
        if isinstance(h, torch.Tensor):
            self.used -= h.numel() * h.element_size()
            return
        import os

        os.remove(h.path)
        self._on_disk -= h.nbytes

    def close(self) -> None:
        if self.dir is not None:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _accumulate_scores(states: dict[int, torch.Tensor], mask: torch.Tensor, L: int, cos_sum: torch.Tensor,
                       ang_sum: torch.Tensor, chunk: int = 128) -> int:
    """Add per-token cosines over the HIDDEN axis for every boundary pair (i, j)."""
    # rows of the kept tokens, gathered one chunk at a time: a boolean index of every state at once would
    # copy all L+1 states of the batch (as much again as the states themselves)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    flat = [states[i].reshape(-1, states[i].shape[-1]) for i in range(L + 1)]  # views, [B*T, d] each
    n = idx.shape[0]
    for c in range(0, n, chunk):  # unit vectors of one chunk of tokens at a time: O(L * chunk * d) memory
        rows = idx[c:c + chunk]
        u = torch.stack([f[rows].float() for f in flat])  # [L+1, n_c, d]
        u.div_(u.norm(dim=-1, keepdim=True).clamp_min_(1e-12))  # in place: one [L+1, chunk, d] buffer
        cos = torch.einsum("and,bnd->nab", u, u).clamp(-1.0, 1.0).to(F64)  # [n_c, L+1, L+1]
        cos_sum += cos.sum(0)
        ang_sum += (torch.arccos(cos) / torch.pi).sum(0)
    return n
