"""Does a second linear correction further downstream recover what the ghost at the cut cannot?

    python -m studies.downstream_study smollm2-135m --layers 13-18 --sites 21 --sites 24 --sites 27 \
        --sites 21,25     (writes reports/downstream_study/downstream_study_smollm2-135m.json)

The shipped ghost (`--norm-features`, the guard's token policy and ridge) is fitted on the fit windows. Then, for each
site list, corrections are fitted progressively: at each kept layer L of the list (dense index), the patched model's
input state h^ of layer L (the ghost and earlier corrections installed) is regressed on [h^, n(h^)] onto the DENSE
model's input state of layer L (ridge least squares in float64, tokens 1.. only: the sink keeps its state), and the
correction h^ <- [h^, n(h^)] C is installed before the next site is fitted. Each site costs two d x d matrices, as
much as the norm-feature ghost. Held-out loss is on the held-out calibration windows; perplexity on 8 x 512 windows
of wiki and PTB (the gate's protocol). A study, not a product option.
"""

from __future__ import annotations

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


def install(layer: torch.nn.Module, C: torch.Tensor):
    """h <- [h, n(h)] C at tokens after the first position, before `layer` runs."""

    def hook(_m, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        out = torch.cat([h, scale_free(h)], -1) @ C.to(h.dtype)
        keep = first_positions(h, kwargs.get("position_ids"))[..., None]
        h2 = torch.where(keep, h, out)
        if args:
            return (h2, *args[1:]), kwargs
        kwargs["hidden_states"] = h2
        return args, kwargs

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def study(loaded, calib, layers: str, site_lists: list[list[int]], ridge: float, log) -> dict:
    model = loaded.model
    d = model.config.hidden_size
    cfg = PruneConfig(layers=layers, norm_features=True)
    sol = solve(loaded, calib, cfg, progress=False, log=log, keep_fit_operators=True)
    removed = sol.removed
    ops = dict(sol.fit_operators)
    held = sorted(heldout_windows(calib.n, cfg.holdout))
    fit_w = [i for i in range(calib.n) if i not in held]
    dense_layers = list(arch.get_layers(model))
    ids_fit, ids_held = calib.input_ids[fit_w], calib.input_ids[held]

    def measure(m) -> dict:
        with torch.no_grad():
            row = {"heldout_loss": mean_nll(m, ids_held, 4)}
            for src in ("wiki", "ptb"):
                row[f"{src}_ppl"] = perplexity(m, loaded.tokenizer, src, 512, 8, 4, progress=False)["ppl"]
        return row

    with temporarily_pruned(model, removed, ops) as m:
        rows = [{"sites": [], **measure(m)}]
    log(f"{layers}: {rows[-1]}")
    dense_inputs: dict[int, torch.Tensor] = {}
    for sites in site_lists:
        # the dense model's states first (nothing installed), then the fits run progressively in the patch
        for L in sites:
            if dense_inputs.get(L) is None:
                dense_inputs[L] = layer_inputs(model, [dense_layers[L]], ids_fit)[0][:, 1:]
        with temporarily_pruned(model, removed, ops) as m:
            handles = []
            try:
                for L in sites:
                    layer = dense_layers[L]
                    X = layer_inputs(m, [layer], ids_fit)[0][:, 1:]
                    Z = torch.cat([X, scale_free(X)], -1).reshape(-1, 2 * d).to(F64)
                    C = fit(Z, dense_inputs[L].reshape(-1, d).to(F64), ridge)
                    before = float((X - dense_inputs[L]).pow(2).sum(-1).mean())
                    after = float((Z.float() @ C - dense_inputs[L].reshape(-1, d)).pow(2).sum(-1).mean())
                    log(f"site {L}: fit-window squared error per token {before:.3f} -> {after:.3f}")
                    handles.append(install(layer, C))
                    del Z, X
                rows.append({"sites": sites, "extra_params": 2 * d * d * len(sites), **measure(m)})
                log(f"{layers}: {rows[-1]}")
            finally:
                for h in handles:
                    h.remove()
    return {"layers": layers, "removed": removed, "token_policy": sol.meta.token_policy,
            "ridge": sol.meta.ridge, "correction_ridge": ridge, "rows": rows}


def main() -> None:
    ap = study_parser(__doc__, "13-18", "downstream_study")
    ap.add_argument("--sites", action="append", required=True,
                    help="dense indices of kept layers whose input gets a correction, e.g. 22 or 22,26 (repeatable)")
    ap.add_argument("--ridge", type=float, default=1e-4)
    a = ap.parse_args()
    t0 = time.perf_counter()
    loaded, calib = load_for_study(a)
    site_lists = [[int(s) for s in group.split(",")] for group in a.sites]
    blocks = [study(loaded, calib, layers, site_lists, a.ridge, lambda s: print(s, flush=True))
              for layers in a.layers]
    write_report(a, blocks, t0, "downstream_study")


if __name__ == "__main__":
    main()
