"""Fold a scaled rotation c Q of the residual stream at a cut into the base architecture's own weights.

The hooked form puts h <- c h Q (row vectors, Q orthogonal, c > 0) at the input of the first kept layer
after the cut. With RMSNorm(x) = g * n(x), n(x) = x / rms(x), we have n(c x Q) = n(x) Q (eps aside), so the
folded model keeps the stream r~ = r Q^T / c (r: the hooked model's stream) and instead, in every kept layer
after the cut and in the head:
    readers (linears after a norm):  W <- W diag(g) Q^T, and the norm's weight g <- 1
    writers (outputs added to r):    W <- Q W / c,       b <- b Q^T / c
    head:                            W_lm <- W_lm diag(g_final) Q^T (untied from the embedding first)
(nn.Linear stores W as [out, in]: y = x W^T + b.) Several cuts compose: the layers after the j-th cut use
the product of the first j maps. Exact up to the norms' eps: the folded norms see rms(r~) = rms(r) / c, which
changes eps / rms^2 by (c^2 - 1) eps / rms^2, negligible for real residual streams (|r| >> sqrt(eps)).

Which norm feeds which linears is data: the "rotation" layout of each family's arch table entry
(ArchSpec.rotation); families whose norms are not rotation invariant (LayerNorm's mean subtraction, Gemma's
1 + w weight with norms on the writer side, post-norm blocks) carry the reason in "rotation_refused" instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ghosted.errors import GhostedError, brief
from ghosted.method import arch
from ghosted.method.sums import F64


def layout_for(spec: arch.ArchSpec) -> arch.RotationLayout:
    """The family's rotation layout, or GhostedError saying why this family cannot take a folded rotation."""
    if spec.rotation is not None:
        return spec.rotation
    why = spec.rotation_refused or ('no rotation layout is known for this family (add a "rotation" to its '
                                    "ghosted/_data/architectures/<family>.json)")
    alt = "replaceme, scalar or none" if spec.fold_exact else ("scalar or none" if spec.scalar_fold_exact else
                                                               "ghost (a hooked operator) or none")
    raise GhostedError(f"--recovery foldable cannot fold a rotation exactly into {spec.name}: {why}; "
                       f"use --recovery {alt}")


# The foldable operators: cq (c Q at the cut), replaceme (T in layer s-1's down projection), both fitted jointly.
FOLDS = ("cq", "replaceme", "cq+replaceme")


def allowed_folds(spec: arch.ArchSpec, cuts: list[tuple[int, int]], requested: str = "auto") -> list[str]:
    """The folds that are exact for this family and these cuts: all of them for auto, else [requested]."""
    layout_for(spec)
    if requested != "auto" and requested not in FOLDS:
        raise GhostedError(f"unknown fold {brief(requested)}: use auto or one of {', '.join(FOLDS)}")
    why_not_t = None
    if not spec.fold_exact:
        why_not_t = f"a fold into the down projection is not exact for {spec.name} ({spec.notes or 'see its spec'})"
    out = []
    for f in (FOLDS if requested == "auto" else (requested,)):
        if f != "cq" and why_not_t:
            continue
        if f == "replaceme" and any(s == 0 for s, _ in cuts):  # cq+replaceme keeps c Q alone at such a cut
            continue
        out.append(f)
    if not out:
        why = why_not_t or "a cut starts at layer 0, so there is no layer before it to hold T"
        raise GhostedError(f"--fold {requested} is not possible here: {why}; use --fold cq or auto")
    return out


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    mod = arch.layer_submodule(layer, path)
    if not isinstance(mod, nn.Linear):
        raise GhostedError(f"{path} is a {type(mod).__name__}, not a Linear: the rotation layout is wrong")
    return mod


def _norm_weight(norm: nn.Module, path: str) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(norm, "bias", None) is not None:
        raise GhostedError(f"{path} ({type(norm).__name__}) is not a bias-free scaled norm: cannot fold a rotation")
    return weight


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def rotate_readers(linears: list[nn.Linear], g: torch.Tensor, Q: torch.Tensor) -> None:
    """W <- W diag(g) Q^T for linears reading g * n(r) (their input becomes n(r~), r = r~ c Q)."""
    for lin in linears:
        W = lin.weight.data.to(F64)
        _set(lin.weight, (W * g.to(F64).to(W.device)[None, :]) @ Q.to(W.device).T)


def rotate_writer(lin: nn.Linear, Q: torch.Tensor, c: float) -> None:
    """W <- Q W / c, b <- b Q^T / c: the output lands on r~ = r Q^T / c."""
    W = lin.weight.data.to(F64)
    Qd = Q.to(W.device)
    _set(lin.weight, Qd @ W / c)
    if lin.bias is not None:
        _set(lin.bias, lin.bias.data.to(F64) @ Qd.T / c)


def untie_output(model: nn.Module) -> None:
    """Give the LM head its own weight when it shares the embedding's (the embedding must stay unrotated)."""
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and embed is not None and head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def fold_rotations(model: nn.Module, rotations: list[tuple[int, torch.Tensor, float]], removed: list[int]) -> str:
    """Fold c Q maps at cuts into the weights of the DENSE-indexed model (before the layers are removed).

    rotations: (b, Q, c) per cut, b the dense index of the first kept layer after it. Returns a summary."""
    spec = arch.get_arch(model)
    layout = layout_for(spec)
    layers = arch.get_layers(model)
    d = int(model.config.hidden_size)
    rotations = sorted(rotations, key=lambda r: r[0])
    removed_set = set(removed)

    def cumulative(i: int) -> tuple[torch.Tensor, float] | None:
        """Product, in cut order, of the maps of the cuts that precede layer i (i == L: the head)."""
        Q, c, any_cut = torch.eye(d, dtype=F64), 1.0, False
        for b, Qj, cj in rotations:
            if b <= i:
                Q, c, any_cut = Q @ Qj.to(F64).cpu(), c * cj, True
        return (Q, c) if any_cut else None

    for i, layer in enumerate(layers):
        rot = cumulative(i)
        if rot is None or i in removed_set:
            continue
        Q, c = rot
        norms = dict(layout.readers)
        extra = [n for n, m in layer.named_children() if "norm" in type(m).__name__.lower() and n not in norms]
        if extra:  # a norm the layout does not know would see a rotated stream
            raise GhostedError(f"layer {i} has norms {extra} outside the {spec.name} rotation layout: cannot fold")
        for norm_path, readers in layout.readers:
            norm = arch.layer_submodule(layer, norm_path)
            g = _norm_weight(norm, norm_path)
            rotate_readers([_linear(layer, r) for r in readers], g.data.detach().clone(), Q)
            g.data.fill_(1.0)
        for w in layout.writers:
            rotate_writer(_linear(layer, w), Q, c)

    Q, c = cumulative(len(layers))
    untie_output(model)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise GhostedError(f"the output head is a {type(head).__name__}, not a Linear: cannot fold a rotation")
    final = arch.get_final_norm(model)
    g = _norm_weight(final, spec.final_norm)
    rotate_readers([head], g.data.detach().clone(), Q)
    g.data.fill_(1.0)
    first = rotations[0][0]
    return (f"c*Q rotation (c = {', '.join(f'{r[2]:.4g}' for r in rotations)}) folded into the readers and "
            f"writers of layers {first}.. and the LM head (norm weights absorbed, head untied)")
