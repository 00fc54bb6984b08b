"""Which layers to remove: selection metrics in a registry, plus the per-layer/per-block score table.

All cosine scores are over the hidden axis, per token, on the pre-final-norm states of ghosted/calibration/capture.py.
Layer numbers are the dense model's (hidden_states[i] is the input of layer i).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ghosted.errors import GhostedError
from ghosted.method.catalog import Registry
from ghosted.method.linalg import relative_residual, solve_ghost

if TYPE_CHECKING:  # a type only: the method never imports the calibration pass at run time
    from ghosted.calibration.plan import CaptureResult

# f(ctx, k) -> removed layers (sorted, dense indices)
SELECTION: Registry[Callable[[SelectContext, int], list[int]]] = Registry("selection metric")

# Metrics that only need the one streaming pass (contiguous blocks of a fixed size).
CONTIGUOUS = ("angular", "cosine", "ghost")


@dataclass
class SelectContext:
    num_layers: int
    result: CaptureResult | None  # scores; for "ghost", also fit/held-out sums of every candidate block of size k
    loss_fn: Callable[[list[int]], float] | None = None  # held-out next-token loss of the model with layers removed
    ghost_loss_fn: Callable[[list[int]], float] | None = None  # same, with the ghost fitted for that block
    shortlist: int = 4
    ridge: float = 1e-6

    @property
    def L(self) -> int:
        return self.num_layers


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'13-18' or '13,15,20' or a mix -> sorted unique dense indices; errors name the bad part."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise GhostedError(f"layer range '{part}' is reversed: write {b}-{a}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError as exc:
            raise GhostedError(f"bad layer spec '{part}': use e.g. 13-18 or 13,15,20") from exc
    if not out:
        raise GhostedError("empty --layers")
    dup = sorted({i for i in out if out.count(i) > 1})
    if dup:
        raise GhostedError(f"layers {dup} are listed more than once (overlapping ranges?)")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise GhostedError(f"layers {bad} are out of range: the model has layers 0-{num_layers - 1}")
    if len(out) >= num_layers:
        raise GhostedError(f"cannot remove all {num_layers} layers")
    return sorted(out)


def check_k(k: int, num_layers: int) -> None:
    if not 1 <= k < num_layers:
        raise GhostedError(f"--remove must be between 1 and {num_layers - 1} for a {num_layers}-layer model, got {k}")


def block_scores(result: CaptureResult, k: int) -> dict[str, list[float]]:
    """Per start s of a k-block: angular distance and Streamline cosine (index = s)."""
    L = result.num_layers
    ang, cos = result.mean_angular(), result.mean_cos()
    return {"angular": [float(ang[s, s + k]) for s in range(L - k + 1)],
            "cosine": [float(cos[s, s + k]) for s in range(L - k + 1)]}


def layer_scores(result: CaptureResult) -> dict[str, list[float]]:
    """Per layer i: Block Influence 1 - E cos(h_i, h_{i+1}) and its angular distance."""
    L = result.num_layers
    cos, ang = result.mean_cos(), result.mean_angular()
    return {"bi": [1.0 - float(cos[i, i + 1]) for i in range(L)], "angular": [float(ang[i, i + 1]) for i in range(L)]}


def ghost_block_errors(result: CaptureResult, k: int, ridge: float) -> list[float | None]:
    """Held-out relative boundary error of the ghost fitted on the fit windows, per block start."""
    out: list[float | None] = []
    for s in range(result.num_layers - k + 1):
        fit, held = result.fit.get((s, s + k)), result.heldout.get((s, s + k))
        if fit is None or held is None or held.n == 0 or fit.gram is None:
            out.append(None)
            continue
        out.append(relative_residual(held, solve_ghost(fit, ridge)))
    return out


@SELECTION.register("angular")
def _angular(ctx: SelectContext, k: int) -> list[int]:
    scores = block_scores(ctx.result, k)["angular"]
    s = min(range(len(scores)), key=lambda i: scores[i])
    return list(range(s, s + k))


@SELECTION.register("cosine")
def _cosine(ctx: SelectContext, k: int) -> list[int]:
    scores = block_scores(ctx.result, k)["cosine"]
    s = max(range(len(scores)), key=lambda i: scores[i])
    return list(range(s, s + k))


@SELECTION.register("bi")
def _bi(ctx: SelectContext, k: int) -> list[int]:
    bi = layer_scores(ctx.result)["bi"]
    return sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:k])


@SELECTION.register("ppl")
def _ppl_greedy(ctx: SelectContext, k: int) -> list[int]:
    """SLEB-style: repeatedly drop the layer whose removal raises calibration loss least."""
    if ctx.loss_fn is None:
        raise GhostedError("ppl selection needs the model and calibration windows")
    from tqdm.auto import tqdm

    removed: list[int] = []
    bar = tqdm(total=k, desc="greedy perplexity selection", unit="layer")
    for _ in range(k):
        best, best_loss = None, math.inf
        for i in range(ctx.L):
            if i in removed:
                continue
            loss = ctx.loss_fn(sorted(removed + [i]))
            if loss < best_loss:
                best, best_loss = i, loss
        removed.append(best)
        bar.update(1)
    bar.close()
    return sorted(removed)


@SELECTION.register("ghost")
def _ghost_aware(ctx: SelectContext, k: int) -> list[int]:
    """Shortlist blocks by the ghost's held-out boundary error (from the sums, no forward pass),
    then cut the one whose ghost-patched model has the lowest held-out next-token loss."""
    errs = ghost_block_errors(ctx.result, k, ctx.ridge)
    cand = [s for s in range(len(errs)) if errs[s] is not None]
    if not cand:
        raise GhostedError("ghost selection needs held-out calibration windows (--holdout > 0)")
    cand.sort(key=lambda s: errs[s])
    # The angular pick joins the shortlist: cheap scores disagree with perplexity (docs/method.md).
    ang = _angular(ctx, k)[0]
    short = list(dict.fromkeys(cand[: ctx.shortlist] + [ang]))
    if ctx.ghost_loss_fn is None or len(short) == 1:
        return list(range(short[0], short[0] + k))
    losses = {s: ctx.ghost_loss_fn(list(range(s, s + k))) for s in short}
    best = min(losses, key=losses.get)
    return list(range(best, best + k))


def score_table(result: CaptureResult, k: int | None = None) -> dict:
    """Everything `ghosted score` prints: per-layer scores, and per-block scores for k."""
    table: dict = {"num_layers": result.num_layers, "tokens": result.score_tokens, "layers": layer_scores(result)}
    if k is not None:
        table["k"] = k
        table["blocks"] = block_scores(result, k)
    return table
