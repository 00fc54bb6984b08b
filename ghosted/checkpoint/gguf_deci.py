"""A ghost checkpoint of a Llama-family model as llama.cpp's `deci` architecture: one extra layer per cut.

llama.cpp's deci graph (src/models/deci.cpp) lets every layer have its own head counts and feed-forward size.
A layer with heads but no KV heads is a "linear attention" layer: it adds `wo @ RMSNorm(h)` to the residual,
then runs its feed-forward block as usual. A feed-forward block whose weights are zero adds its down-projection
bias. So one such layer computes `h + n(h) W_n + b` exactly (n(h) = h / rms(h), the attention norm's gain set
to one): the exportable ghost (`--exportable`, method.linalg.solve_deci). Its feed-forward block keeps a small
width because a layer with none skips its attention output altogether.

A ghost with a sink detector (token policy detect) gets one more layer in front, attention-free: its
feed-forward block reads RMSNorm(h) and two SwiGLU units compute silu(z) - silu(z - 1), z = n(h) . w + c (the
gate's weights and biases; the up projection's biases +1 and -1), times the shift as the down projection: the
detector of modeling_ghosted.Ghost, exactly.

The kept layers are written as they are, renumbered around the ghost layers. A ghost with any other part (a
map of h itself, a low-rank or token-shift part, a rule for position 0) has no deci form and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghosted.errors import GhostedError

GHOST_FF = 32  # feed-forward width of a ghost layer: zero weights; its down-projection bias carries the ghost's b
GHOST_PARTS = ("weight", "norm_weight", "bias")


@dataclass(frozen=True)
class DeciLayout:
    """Where every GGUF block comes from: ("kept", pruned layer index), ("detect", site) or ("ghost", site)."""

    blocks: tuple[tuple[str, int], ...]
    n_head: int
    n_kv: int
    n_ff: int

    @property
    def block_of_kept(self) -> dict[int, int]:
        return {i: j for j, (kind, i) in enumerate(self.blocks) if kind == "kept"}

    def head_counts(self) -> list[int]:  # a ghost layer's n_head only has to be > 0; a detector has no attention
        return [0 if kind == "detect" else self.n_head for kind, _ in self.blocks]

    def kv_head_counts(self) -> list[int]:
        return [self.n_kv if kind == "kept" else 0 for kind, _ in self.blocks]

    def ff_lengths(self) -> list[int]:
        return [self.n_ff if kind == "kept" else GHOST_FF for kind, _ in self.blocks]


def refusal(ghost: dict) -> str | None:
    """Why this ghost (a config ghost-list entry) has no deci form, or None."""
    if ghost.get("rank") is not None:
        return "it is low-rank (h + (h U) V^T)"
    if ghost.get("shift"):
        return "it reads the previous token (token shift)"
    if ghost.get("sink_shift"):
        return "position 0 has its own map (token policy sink; detect is the exportable one)"
    if not ghost.get("norm") or ghost.get("raw", True):
        return "it maps h itself, not only h/rms(h)"
    return None


def layout(cfg: dict, ghosts: list[dict], base_arch: str, gguf_arch: str) -> DeciLayout:
    """The block order of the deci GGUF; GhostedError naming the reason when the checkpoint has no deci form."""
    if gguf_arch != "llama":
        raise GhostedError(f"a ghost checkpoint of {base_arch} cannot be exported: llama.cpp's deci architecture, "
                           "which holds the ghost as a layer, is a Llama-family graph")
    for g in ghosts:
        why = refusal(g)
        if why is not None:
            raise GhostedError(f"the ghost at layer {g.get('site')} has no llama.cpp form: {why}; prune with "
                               "`--exportable` for a ghost that llama.cpp runs, or `--recovery foldable` for a "
                               "plain checkpoint")
    n_kept = int(cfg["num_hidden_layers"])
    sites = sorted(int(g["site"]) for g in ghosts)
    if len(set(sites)) != len(sites) or any(not 0 <= s <= n_kept for s in sites):
        raise GhostedError(f"ghost sites {sites} do not fit a checkpoint of {n_kept} layers")
    blocks: list[tuple[str, int]] = []
    for i in range(n_kept + 1):
        if i in sites:
            if any(int(g["site"]) == i and g.get("detect") for g in ghosts):
                blocks.append(("detect", i))
            blocks.append(("ghost", i))
        if i < n_kept:
            blocks.append(("kept", i))
    n_head = int(cfg["num_attention_heads"])
    return DeciLayout(tuple(blocks), n_head, int(cfg.get("num_key_value_heads") or n_head),
                      int(cfg["intermediate_size"]))


def detector_tensors(site: int, parts: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """The GGUF tensors of the attention-free layer that adds detect_shift to the tokens the detector picks."""
    w, c, delta = parts.get("detect_weight"), parts.get("detect_bias"), parts.get("detect_shift")
    if w is None or c is None or delta is None:
        raise GhostedError(f"the ghost at layer {site} lacks its sink detector tensors (ghosts.{site}.detect_*)")
    gate, gate_b = torch.zeros(GHOST_FF, d), torch.zeros(GHOST_FF)
    up_b, down = torch.zeros(GHOST_FF), torch.zeros(d, GHOST_FF)
    gate[0] = gate[1] = w.to(torch.float32)
    gate_b[0], gate_b[1] = float(c.reshape(-1)[0]), float(c.reshape(-1)[0]) - 1.0
    up_b[0], up_b[1] = 1.0, -1.0
    down[:, 0] = down[:, 1] = delta.to(torch.float32)
    return {
        "ffn_norm.weight": torch.ones(d),
        "ffn_gate.weight": gate,
        "ffn_gate.bias": gate_b,
        "ffn_up.weight": torch.zeros(GHOST_FF, d),
        "ffn_up.bias": up_b,
        "ffn_down.weight": down,
    }


def ghost_tensors(site: int, parts: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """The GGUF tensors (name suffix after `blk.N.`) of the ghost layer at `site`, HF [out, in] orientation.

    The ghost maps row vectors, out = h W + n(h) W_n + b; a layer's linear computes W_hf @ x, so wo = W_n^T."""
    W = parts.get("weight")
    if W is None or parts.get("norm_weight") is None:
        raise GhostedError(f"the ghost at layer {site} lacks its weights (ghosts.{site}.weight / .norm_weight)")
    if not torch.equal(W.to(torch.float64), torch.eye(d, dtype=torch.float64)):
        raise GhostedError(f"the ghost at layer {site} maps h itself (its weight is not the identity): llama.cpp's "
                           "deci layer holds only h + n(h) W_n + b; prune with `--exportable`")
    zeros = torch.zeros
    bias = parts.get("bias")
    return {
        "attn_norm.weight": torch.ones(d),
        "attn_output.weight": parts["norm_weight"].to(torch.float32).T.contiguous(),
        "ffn_norm.weight": torch.ones(d),
        "ffn_gate.weight": zeros(GHOST_FF, d),
        "ffn_up.weight": zeros(GHOST_FF, d),
        "ffn_down.weight": zeros(d, GHOST_FF),
        "ffn_down.bias": (bias if bias is not None else zeros(d)).to(torch.float32),
    }
