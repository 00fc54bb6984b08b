"""How much more can a per-token operator recover? Richer regressors on top of the norm-feature ghost, one cut.

    python -m studies.operator_study smollm2-135m --layers 10-18 --layers 13-18
        (writes reports/operator_study/operator_study_smollm2-135m.json)

For each block, the shipped ghost (`--norm-features`, sink policy, the guard's ridge) is fitted on the fit windows
only, and so is every variant below, by one ridge least-squares fit of the block's output on

- `neurons:M`: [h, n(h), F(h)], F the M removed-MLP neurons (SwiGLU of the RMSNorm'd input, gain folded in) with the
  largest mean |activation| x |down-projection column|, evaluated on the block's *input* state;
- `random:M`: [h, n(h), silu(n(h) R)], R a fixed Gaussian d x M (random features);
- `prev`: [h, n(h), n(h_{t-1})], the previous token's scale-free state (a token shift: what a previous-token
  attention head reads; the product's `--token-shift`); `prev:K`: the K previous tokens' states, one matrix each
  (a short causal convolution); `prev+mean`: also the running mean of n(h) over the window;
- `attn`: [h, n(h), A], A the removed layers' own attention outputs (input norm, causal attention over the whole
  window, sink included, output projection) evaluated on the block's *input* state: an upper bound on what context
  read by those heads could add (it keeps the removed attention weights, so it is no compression; Llama-style
  layers only: input_layernorm, self_attn and the model's rotary_emb).

The sink (position 0) keeps the shipped sink shift and is not a context token. Held-out loss is on the held-out
calibration windows; perplexity on 8 x 512 windows of wiki and PTB (the gate's protocol). This is a study, not a
product option: `prev` needs the previous token's state at decode time, which a stateless hook does not have.
Numbers are float64 fits of float32 states; the capture keeps the fit windows' block input and output in memory
(48 x 511 x d x 4 bytes each for SmolLM2), which is fine for this model and not meant for large ones.
"""

from __future__ import annotations

import math
import time

import torch

from ghosted.config import PruneConfig
from ghosted.evaluation.perplexity import mean_nll, perplexity
from ghosted.method import arch
from ghosted.method.sums import first_positions, scale_free
from ghosted.method.surgery import temporarily_pruned
from ghosted.solve.solver import heldout_windows, solve
from studies.common import fit, layer_inputs, load_for_study, study_parser, write_report

F64 = torch.float64


def block_states(model, ids: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of layer `start` and of layer `end` (the block's output) for every window, float32 [n, T, d]."""
    layers = arch.get_layers(model)
    X, Y = layer_inputs(model, [layers[start], layers[end]], ids)
    return X, Y


def shifted(n: torch.Tensor, lag: int = 1) -> torch.Tensor:
    """n(h_{t-lag}) of [B, T, d] states of tokens 1.. (the first `lag` get zeros)."""
    out = torch.zeros_like(n)
    out[:, lag:] = n[:, :-lag]
    return out


def running_mean(n: torch.Tensor) -> torch.Tensor:
    count = torch.arange(1, n.shape[1] + 1, dtype=n.dtype, device=n.device).view(1, -1, 1)
    return n.cumsum(1) / count


class Features:
    """The regressors of one variant as a function of [B, T, d] states of tokens 1.. (the sink excluded)."""

    def __init__(self, name: str, model, start: int, end: int, d: int, seed: int = 0) -> None:
        self.name = name
        kind, _, m = name.partition(":")
        self.kind = kind
        self.input_params = 0  # the features' own weights (what they cost beyond their output rows)
        self.lags = int(m) if kind == "prev" and m else 1  # prev:K reads the K previous tokens
        if kind == "neurons":
            layers = arch.get_layers(model)
            gates, ups, downs = [], [], []
            for i in range(start, end):
                layer = layers[i]
                gain = layer.post_attention_layernorm.weight.detach()
                gates.append(layer.mlp.gate_proj.weight.detach() * gain)
                ups.append(layer.mlp.up_proj.weight.detach() * gain)
                downs.append(layer.mlp.down_proj.weight.detach().norm(dim=0))
            self.gate, self.up, self.down_norm = torch.cat(gates), torch.cat(ups), torch.cat(downs)
            self.m = int(m)
            self.sel = None
            self.input_params = 2 * d * self.m  # gate and up rows
        elif kind == "random":
            g = torch.Generator().manual_seed(seed)
            self.R = torch.randn(d, int(m), generator=g) * (2.0 / math.sqrt(d))
            self.input_params = d * int(m)
        elif kind == "attn":
            self.layers = list(arch.get_layers(model))[start:end]
            self.rotary = model.model.rotary_emb
            self.input_params = sum(p.numel() for lay in self.layers for p in lay.self_attn.parameters())
        elif kind not in ("prev", "prev+mean"):
            raise SystemExit(f"unknown variant {name}")

    def context(self, h: torch.Tensor) -> list[torch.Tensor]:
        """`attn` features of every token of [B, T, d] whole-window states (position 0 included)."""
        T = h.shape[1]
        pos = torch.arange(T).unsqueeze(0).expand(h.shape[0], -1)
        mask = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T).to(h.dtype)
        emb = self.rotary(h, pos)
        with torch.no_grad():
            return [lay.self_attn(lay.input_layernorm(h), position_embeddings=emb, attention_mask=mask)[0]
                    for lay in self.layers]

    def choose_neurons(self, n_fit: torch.Tensor) -> None:
        acts = torch.nn.functional.silu(n_fit @ self.gate.T) * (n_fit @ self.up.T)
        importance = acts.abs().mean(0) * self.down_norm
        self.sel = torch.argsort(importance, descending=True)[:self.m]

    def __call__(self, n: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "neurons":
            return [torch.nn.functional.silu(n @ self.gate[self.sel].T) * (n @ self.up[self.sel].T)]
        if self.kind == "random":
            return [torch.nn.functional.silu(n @ self.R)]
        if self.kind == "prev":
            return [shifted(n, lag) for lag in range(1, self.lags + 1)]
        return [shifted(n), running_mean(n)]


class Extended(torch.nn.Module):
    """h <- [h, n(h), features] W at tokens 1.., h + sink shift at position 0."""

    def __init__(self, feats: Features, W: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.feats, self.W, self.shift = feats, W, shift

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = scale_free(h)
        rest = h.new_zeros(*h.shape[:2], self.W.shape[0] - 2 * h.shape[-1])
        if h.shape[1] > 1 and self.feats.kind == "attn":  # whole-window context (no cache: a study)
            rest[:, 1:] = torch.cat(self.feats.context(h), -1)[:, 1:]
        elif h.shape[1] > 1:
            rest[:, 1:] = torch.cat(self.feats(n[:, 1:]), -1)
        out = torch.cat([h, n, rest], -1) @ self.W
        return torch.where(first_positions(h, position_ids)[..., None], h + self.shift, out)


def study(loaded, calib, layers: str, variants: list[str], ridges: list[float], log) -> dict:
    model = loaded.model
    d = model.config.hidden_size
    cfg = PruneConfig(layers=layers, norm_features=True)
    sol = solve(loaded, calib, cfg, progress=False, log=log, keep_fit_operators=True)
    removed = sol.removed
    (cut, op), = sol.fit_operators.items()
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    fit_w = [i for i in range(calib.n) if i not in held]
    X, Y = block_states(model, calib.input_ids[fit_w], cut[0], cut[1])
    X_whole = X
    X, Y = X[:, 1:], Y[:, 1:]  # the sink keeps its shift
    N = scale_free(X)
    shift = op.sink_shift.float() if op.sink_shift is not None else torch.zeros(d)
    ids_held = calib.input_ids[held]

    def measure(ghost=None) -> dict:
        with temporarily_pruned(model, removed, {cut: op}) as m:
            (site, module), = m.ghosts.items()
            saved = module.forward
            if ghost is not None:
                module.forward = ghost.forward
            try:
                with torch.no_grad():
                    row = {"heldout_loss": mean_nll(m, ids_held, 4)}
                    for src in ("wiki", "ptb"):
                        row[f"{src}_ppl"] = perplexity(m, loaded.tokenizer, src, 512, 8, 4, progress=False)["ppl"]
            finally:
                module.forward = saved
        return row

    rows = [{"variant": "norm-feature ghost (shipped, fit windows)", "extra_params": 0, **measure()}]
    log(f"{layers}: {rows[-1]}")
    for name in variants:
        feats = Features(name, model, cut[0], cut[1], d)
        if feats.kind == "neurons":
            feats.choose_neurons(N.reshape(-1, d)[::7])
        if feats.kind == "attn":
            extra_feats = [torch.cat([a[:, 1:] for a in feats.context(X_whole[w:w + 4])], -1)
                           for w in range(0, X_whole.shape[0], 4)]
            Z = torch.cat([X, N, torch.cat(extra_feats)], -1)
        else:
            Z = torch.cat([X, N, *feats(N)], -1)
        Z = Z.reshape(-1, Z.shape[-1]).to(F64)
        target = Y.reshape(-1, d).to(F64)
        for ridge in ridges:
            W = fit(Z, target, ridge)
            # beyond the shipped ghost's W and W_n: the features' output rows, and their own input weights
            extra = (W.shape[0] - 2 * d) * d + feats.input_params
            row = {"variant": name, "ridge": ridge, "extra_params": extra,
                   **measure(Extended(feats, W, shift))}
            rows.append(row)
            log(f"{layers}: {row}")
        del Z
    return {"layers": layers, "removed": removed, "token_policy": sol.meta.token_policy,
            "ridge": sol.meta.ridge, "rows": rows}


def main() -> None:
    ap = study_parser(__doc__, "10-18", "operator_study")
    ap.add_argument("--variants", default="neurons:1024,random:1024,prev,prev+mean")
    ap.add_argument("--ridges", default="1e-4")
    a = ap.parse_args()
    t0 = time.perf_counter()
    loaded, calib = load_for_study(a)
    blocks = [study(loaded, calib, layers, a.variants.split(","), [float(r) for r in a.ridges.split(",")],
                    lambda s: print(s, flush=True)) for layers in a.layers]
    write_report(a, blocks, t0, "operator_study")


if __name__ == "__main__":
    main()
