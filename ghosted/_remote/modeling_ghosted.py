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
# n(h) = h / sqrt(mean(h^2) + NORM_EPS): h <- h W + n(h) W_n (+ b). A ghost with a sink shift maps the first token of a
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


class Ghost(nn.Module):
    """One boundary operator on the residual stream (row vectors)."""

    def __init__(self, hidden_size: int, rank: int | None = None, bias: bool = False, sink_shift: bool = False,
                 norm: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.sink_shift = nn.Parameter(torch.zeros(hidden_size)) if sink_shift else None
        if rank is None:
            self.weight = nn.Parameter(torch.eye(hidden_size))  # [d, d]
        else:
            self.U = nn.Parameter(torch.zeros(hidden_size, rank))  # [d, r]
            self.V = nn.Parameter(torch.zeros(hidden_size, rank))  # [d, r]
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.norm_weight = nn.Parameter(torch.zeros(hidden_size, hidden_size)) if norm else None  # [d, d]

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.rank is None:
            out = h @ self.weight.to(h.dtype)
        else:
            out = h + (h @ self.U.to(h.dtype)) @ self.V.to(h.dtype).T
        if self.norm_weight is not None:
            out = out + scale_free(h) @ self.norm_weight.to(h.dtype)
        if self.bias is not None:
            out = out + self.bias.to(h.dtype)
        if self.sink_shift is not None:
            first = first_positions(h, position_ids)
            if bool(first.any()):
                out = torch.where(first[..., None], h + self.sink_shift.to(h.dtype), out)
        return out


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
                       sink_shift=bool(g.get("sink_shift", False)), norm=bool(g.get("norm", False)))
        model.ghosts[str(site)] = module
        target = layers[site] if site < len(layers) else _resolve(model, final_norm_path)
        handles.append(target.register_forward_pre_hook(_make_hook(module), with_kwargs=True))
    return handles


def _make_hook(ghost: Ghost):
    def hook(_module, args, kwargs):
        pos = kwargs.get("position_ids")
        if args:
            return (ghost(args[0], pos), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = ghost(kwargs["hidden_states"], pos)
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
