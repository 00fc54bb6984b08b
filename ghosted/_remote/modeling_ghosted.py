# Ghost operators for a layer-pruned causal LM (ghosted). This file is copied next to every
# ghost checkpoint (with configuration_ghosted.py, and a few lines at the end naming the base
# architecture) so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it
# with plain transformers; the ghosted package imports the same code. `ghosted verify DIR` checks that
# a folder's copy is exactly the code the installed ghosted writes.
#
# A ghost checkpoint is its own model type ("ghosted", GhostedForCausalLM) and keeps its weights in
# model.ghosted.safetensors (a transformers weights "variant"), so a loader that does not run this code
# refuses the folder instead of loading the base model without its ghosts.
#
# A ghost sits where removed layers used to be and maps the residual stream h <- h W (+ b), or
# h <- h + (h U) V^T for a low-rank ghost. A ghost with norm features also reads the scale-free state
# n(h) = h / sqrt(mean(h^2) + NORM_EPS): h <- h W + n(h) W_n (+ b). A token-shift ghost also reads the previous
# token's scale-free state, h_t <- ... + n(h_{t-1}) W_p, for tokens whose previous token sits at position >= 1 (the
# sink at position 0 is never read; its state is an outlier). At decode time the previous token's n(h) comes from a
# small table kept on the generation cache (one d-vector per token and ghost; beam search reorders it through
# model._reorder_cache, and a cropped cache is followed). A ghost with a sink shift maps the first token of a
# sequence (position id 0, the attention sink) by h <- h + sink_shift instead. It runs as a forward
# pre-hook on the first kept layer after the cut (or on the final norm when the cut reaches the end). Its parameters live
# in the state dict as `ghosts.<site>.*`, <site> being that kept layer's index in the pruned
# model (or the pruned layer count for the final norm).
from __future__ import annotations

import torch
from torch import nn

WEIGHTS_VARIANT = "ghosted"
NORM_EPS = 1e-6


def scale_free(h: torch.Tensor) -> torch.Tensor:
    """n(h) = h / sqrt(mean(h^2) + NORM_EPS) over the hidden axis: what an RMSNorm computes before its gain."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + NORM_EPS)


def sink_step(z: torch.Tensor) -> torch.Tensor:
    """silu(z) - silu(z - 1): 0 for z << 0, 1 for z >> 1 (two SwiGLU units compute it in llama.cpp)."""
    return nn.functional.silu(z) - nn.functional.silu(z - 1)


class Ghost(nn.Module):
    """One boundary operator on the residual stream (row vectors)."""

    def __init__(self, hidden_size: int, rank: int | None = None, bias: bool = False, sink_shift: bool = False,
                 norm: bool = False, shift: bool = False, detect: bool = False, raw: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.raw = raw  # False: the weight is the identity and is not applied (h + n(h) W_n + b, llama.cpp's form)
        self.sink_shift = nn.Parameter(torch.zeros(hidden_size)) if sink_shift else None
        if rank is None:
            self.weight = nn.Parameter(torch.eye(hidden_size))  # [d, d]
        else:
            self.U = nn.Parameter(torch.zeros(hidden_size, rank))  # [d, r]
            self.V = nn.Parameter(torch.zeros(hidden_size, rank))  # [d, r]
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.norm_weight = nn.Parameter(torch.zeros(hidden_size, hidden_size)) if norm else None  # [d, d]
        self.shift_weight = nn.Parameter(torch.zeros(hidden_size, hidden_size)) if shift else None  # [d, d]
        # sink detector: tokens whose n(h) scores high get detect_shift added before the map (sink_step)
        self.detect_weight = nn.Parameter(torch.zeros(hidden_size)) if detect else None  # [d]
        self.detect_bias = nn.Parameter(torch.zeros(1)) if detect else None  # [1]
        self.detect_shift = nn.Parameter(torch.zeros(hidden_size)) if detect else None  # [d]

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                prev: torch.Tensor | None = None, past: int = 0, n: torch.Tensor | None = None) -> torch.Tensor:
        """prev, past: for a token-shift ghost that continues a cached sequence, n(h) of the token before h's first
        ([B, 1, d]; None: a sequence that starts here) and the number of tokens before this call. n: scale_free(h)
        when the caller has it already."""
        if self.detect_weight is not None:
            h = h + sink_step(scale_free(h) @ self.detect_weight.to(h.dtype) + self.detect_bias.to(h.dtype))[..., None] \
                * self.detect_shift.to(h.dtype)
            n = None
        if self.rank is None:
            out = h @ self.weight.to(h.dtype) if self.raw else h
        else:
            out = h + (h @ self.U.to(h.dtype)) @ self.V.to(h.dtype).T
        if n is None and (self.norm_weight is not None or self.shift_weight is not None):
            n = scale_free(h)
        if self.norm_weight is not None:
            out = out + n @ self.norm_weight.to(h.dtype)
        if self.shift_weight is not None:
            out = out + previous_states(n, position_ids, prev, past) @ self.shift_weight.to(h.dtype)
        if self.bias is not None:
            out = out + self.bias.to(h.dtype)
        if self.sink_shift is not None:
            first = first_positions(h, position_ids)
            if bool(first.any()):
                out = torch.where(first[..., None], h + self.sink_shift.to(h.dtype), out)
        return out


def previous_states(n: torch.Tensor, position_ids: torch.Tensor | None, prev: torch.Tensor | None = None,
                    past: int = 0) -> torch.Tensor:
    """[B, T, d]: n(h_{t-1}) where the previous token is at position >= 1, zeros elsewhere (the sink and the token
    after it, and a token with no previous one); n = scale_free(h) of the call's tokens [B, T, d]. prev: n(h) of
    the token before h's first ([B, 1, d]) or None; without position ids, positions count from `past` (the tokens
    before this call)."""
    before = prev.to(n.dtype) if prev is not None else n.new_zeros(n.shape[0], 1, n.shape[-1])
    shifted = torch.cat([before, n[:, :-1]], 1)
    B, T = n.shape[:2]
    if position_ids is not None:
        pid = position_ids if position_ids.dim() == 2 else position_ids[None]
        reads = (pid >= 2).to(n.device).expand(B, T)
    else:
        reads = (torch.arange(T, device=n.device) + past >= 2)[None].expand(B, T)
    return shifted * reads[..., None].to(n.dtype)


def first_positions(h: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: the tokens at position 0. Without position ids (a layer that is not given them), the
    first index of a multi-token call counts as position 0."""
    B, T = h.shape[:2]
    if position_ids is not None:
        pid = position_ids if position_ids.dim() == 2 else position_ids[None]
        return (pid == 0).to(h.device).expand(B, T)
    first = torch.zeros(B, T, dtype=torch.bool, device=h.device)
    if T > 1:
        first[:, 0] = True
    return first


def _resolve(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def attach_ghosts(model: nn.Module, ghosts: list[dict], layers_path: str, final_norm_path: str) -> list:
    """Create `model.ghosts` from the config's ghost list and hook each one in place; returns the hook handles."""
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
        else model.config.hidden_size
    model.ghosts = nn.ModuleDict()
    layers = _resolve(model, layers_path)
    handles = []
    for g in ghosts:
        site = int(g["site"])
        module = Ghost(hidden, rank=g.get("rank"), bias=bool(g.get("bias", False)),
                       sink_shift=bool(g.get("sink_shift", False)), norm=bool(g.get("norm", False)),
                       shift=bool(g.get("shift", False)), detect=bool(g.get("detect", False)),
                       raw=bool(g.get("raw", True)))
        model.ghosts[str(site)] = module
        target = layers[site] if site < len(layers) else _resolve(model, final_norm_path)
        handles.append(target.register_forward_pre_hook(_make_hook(module, site), with_kwargs=True))
    if any(g.get("shift") for g in ghosts):
        model._reorder_cache = _reorder_cache  # beam search: generate() reorders the cache through this
    elif "_reorder_cache" in vars(model):
        del model._reorder_cache
    return handles


# attribute of a generation cache: {site: (buffer [B, capacity, d], length)}, the n(h) of every cached token; the
# buffer grows by doubling, so decoding one token at a time costs amortised O(1) copies per token
SHIFT_TABLE = "_ghosted_shift"
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # the name differs across transformers versions


def _reorder_cache(cache, beam_idx: torch.Tensor):
    cache.reorder_cache(beam_idx)
    table = getattr(cache, SHIFT_TABLE, None) or {}
    for site, (buf, length) in table.items():
        table[site] = (buf.index_select(0, beam_idx.to(buf.device)), length)
    return cache


def _shifted_input(ghost: Ghost, site: int, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """A token-shift ghost's output, reading (and extending) the cache's table of earlier tokens' n(h)."""
    pos = kwargs.get("position_ids")
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None:  # some layers (GPT-2's blocks) take the cache as a positional argument
        cache = next((a for a in args[1:] if hasattr(a, "get_seq_length")), None)
    if cache is None:
        return ghost(h, pos)
    T = h.shape[1]
    # the kept layers before this site have already cached this call's tokens (none do before site 0)
    past = int(cache.get_seq_length()) - (T if site > 0 else 0)
    table = getattr(cache, SHIFT_TABLE, None)
    if table is None:
        table = {}
        setattr(cache, SHIFT_TABLE, table)
    B, end = h.shape[0], past + T
    buf, length = table.get(site, (None, 0))
    if past > 0 and (buf is None or length < past or buf.shape[0] != B):
        raise RuntimeError(f"ghosted: the cache holds {past} earlier tokens but no token-shift state for them "
                           f"(ghost at layer {site}): run the prompt through this model with this cache")
    prev = buf[:, past - 1:past] if past > 0 else None
    n = scale_free(h)
    out = ghost(h, pos, prev, past, n)
    n = n.detach()
    if buf is None or buf.shape[0] != B or buf.shape[1] < end or buf.dtype != n.dtype or buf.device != n.device:
        grown = n.new_empty(B, max(end, 2 * (0 if buf is None else buf.shape[1])), n.shape[-1])
        if past > 0:
            grown[:, :past] = buf[:, :past]
        buf = grown
    buf[:, past:end] = n
    table[site] = (buf, end)  # after a crop, the dropped tokens' states are overwritten from `past` on
    return out


def _make_hook(ghost: Ghost, site: int):
    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        out = _shifted_input(ghost, site, h, args, kwargs) if ghost.shift_weight is not None \
            else ghost(h, kwargs.get("position_ids"))
        if args:
            return (out, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = out
        return args, kwargs

    return hook


class GhostedMixin:
    """Mixed in front of a transformers *ForCausalLM class: builds and hooks the ghosts on init, and reads and
    writes the weights under the "ghosted" variant name."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        meta = getattr(config, "ghosted", None) or {}
        if meta.get("ghosts"):
            attach_ghosts(self, meta["ghosts"], meta["layers_path"], meta["final_norm_path"])

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        kwargs.setdefault("variant", WEIGHTS_VARIANT)
        return super().save_pretrained(*args, **kwargs)
