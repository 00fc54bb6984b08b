"""Optional ghost distillation: train only the recovery parameters against the dense model's distribution.

The training-free operators (ghost matrices W or low-rank U, V, biases and sink shifts) are the starting
point. Everything else stays frozen. The target is the DENSE model's next-token distribution on the
calibration windows, cached once as its top-k log-probabilities; the loss is the KL divergence restricted
to those k tokens, sum_k p_k (log p_k - log q_k) with p the teacher's and q the pruned model's full-vocab
softmax. AdamW with a cosine schedule (linear warm-up), held-out windows for early stopping. The guard
keeps the training-free operators unless the best distilled ones have a lower held-out next-token loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ghosted.config import DistillConfig  # noqa: F401  re-exported: the settings live in ghosted.config
from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import chunk_rows, mean_nll, next_token_logits, split_head
from ghosted.memory import release_memory
from ghosted.method.operator import Operator
from ghosted.method.sums import F64
from ghosted.method.surgery import Pair, ghost_site, temporarily_pruned


@dataclass
class DistillResult:
    """The operators to keep (distilled or the training-free ones) and how the training went."""

    operators: dict[Pair, Operator]
    kept: str  # "distilled" | "training-free"
    heldout_nll_before: float
    heldout_nll_after: float
    steps_run: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # {"step", "train_kl", "heldout_nll"} at each evaluation

    def as_meta(self) -> dict:
        return {"kept": self.kept, "heldout_nll_training_free": self.heldout_nll_before,
                "heldout_nll_distilled": self.heldout_nll_after, "steps_run": self.steps_run,
                "seconds": round(self.seconds, 1), "curve": self.curve}


@torch.no_grad()
def teacher_topk(model: torch.nn.Module, input_ids: torch.Tensor, k: int, batch_size: int = 4,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's top-k next-token log-probs for every window: values [N, T-1, k] float32, indices int64."""
    device = next(model.parameters()).device
    vals, idx = [], []
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="teacher logits", disable=not progress,
                      unit="batch"):
        ids = input_ids[start:start + batch_size].to(device)
        for logits, _ in next_token_logits(model, ids):  # one chunk of tokens' logits at a time
            v, i = logits.log_softmax(-1).topk(k, dim=-1)
            vals.append(v.cpu())
            idx.append(i.cpu())
        # glibc keeps what torch's worker threads freed in their own arenas: hand it back, or the resident size
        # grows with every batch (docs/healing.md, "Cost")
        release_memory(collect=False)
    T1 = input_ids.shape[1] - 1
    return torch.cat(vals).reshape(-1, T1, k), torch.cat(idx).reshape(-1, T1, k)


def topk_kl(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, tail: bool = False) -> torch.Tensor:
    """Mean over tokens of sum_k p_k (log p_k - log q_k); logits [B, T-1, V], t_* [B, T-1, k].

    `tail`: also the term of the teacher's mass outside its top k, p_r (log p_r - log q_r) with p_r = 1 - sum_k p_k
    and q_r the student's mass on every other token: the exact KL between the two distributions over k + 1
    outcomes. Without it the loss is lowest when the student puts ALL its mass on the teacher's top k (sum_k q_k =
    1 > sum_k p_k), which starves the tokens outside them, the true next token among them."""
    logq_all = logits.float().log_softmax(-1)
    logq = logq_all.gather(-1, t_idx)
    p = t_logp.exp()
    kl = (p * (t_logp - logq)).sum(-1)
    if tail:
        p_rest = (1 - p.sum(-1)).clamp_min(0)
        logq_rest = logq_all.scatter(-1, t_idx, float("-inf")).logsumexp(-1)
        kl = kl + torch.special.xlogy(p_rest, p_rest) - p_rest * logq_rest
    return kl.mean()


def kl_backward(model: torch.nn.Module, ids: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor,
                tail: bool = False) -> float:
    """topk_kl of one batch, its gradient accumulated into the trainable parameters; the LM head runs on one
    chunk of tokens at a time (ghosted.evaluation.perplexity), so no [B, T, V] logits or their gradient are
    held. Nothing is accumulated when the loss is not finite (the value says so)."""
    split = split_head(model)
    if split is None:  # plain forward: full logits
        loss = topk_kl(model(input_ids=ids, use_cache=False).logits[:, :-1], t_logp, t_idx, tail)
        if torch.isfinite(loss):
            loss.backward()
        return float(loss.detach())
    decoder, head, post = split
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, d]
    # the head's part chunk by chunk into h.grad, then one backward through the decoder
    h = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
    k = t_idx.shape[-1]
    t_logp, t_idx = t_logp.reshape(-1, k), t_idx.reshape(-1, k)
    n, rows, total = h.shape[0], chunk_rows(head.weight.shape[0]), 0.0
    for r in range(0, n, rows):
        logits = post(model.config, head(h[r:r + rows]))
        part = topk_kl(logits, t_logp[r:r + rows].to(logits.device), t_idx[r:r + rows].to(logits.device), tail)
        part = part * (min(rows, n - r) / n)  # chunk means -> the mean over all n tokens
        part.backward()
        total += float(part.detach())
    if math.isfinite(total):
        hidden.backward(h.grad.view_as(hidden))
    return total


def ghost_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What distillation trains: every ghost parameter but the sink detector (a hard step, no useful gradient)
    and an exportable ghost's identity map of h (its weight stays I so that llama.cpp's deci layer holds it)."""
    if not hasattr(model, "ghosts"):
        return []
    out = []
    for g in model.ghosts.values():
        out += [p for name, p in g.named_parameters()
                if not name.startswith("detect_") and not (not g.raw and name == "weight")]
    return out


def _read_operators(model: torch.nn.Module, removed: list[int], start: dict[Pair, Operator]) -> dict[Pair, Operator]:
    """The hooked ghosts' current parameters as operators (float64), same kinds as `start`."""
    out = {}
    for cut, op in start.items():
        g = model.ghosts[str(ghost_site(cut, removed))]
        def grab(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", F64).clone()
        if op.kind == "lowrank":
            new = Operator("lowrank", U=grab(g.U), V=grab(g.V))
        else:
            new = Operator("full", W=grab(g.weight))
        new.bias, new.sink_shift = grab(g.bias), grab(g.sink_shift)
        new.Wn = grab(getattr(g, "norm_weight", None))
        new.Wp = grab(getattr(g, "shift_weight", None))
        new.detect_w, new.detect_b = grab(getattr(g, "detect_weight", None)), grab(getattr(g, "detect_bias", None))
        new.detect_shift = grab(getattr(g, "detect_shift", None))
        new.info = {**op.info, "distilled": True}
        out[cut] = new
    return out


@dataclass
class KDRun:
    """What one knowledge-distillation loop did: the held-out loss before and at its best, the snapshot taken at
    that best (None when no evaluation beat `before`), the steps run, why it stopped and the curve."""

    before: float
    best: float
    best_state: Any
    steps: int
    stopped: str  # "steps" | "patience" | "time budget" | "non-finite loss"
    curve: list[dict] = field(default_factory=list)


def kd_train(model: torch.nn.Module, params: list[torch.nn.Parameter], input_ids: torch.Tensor, fit_rows: list[int],
             held_ids: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, cfg: Any,
             snapshot: Callable[[], Any], progress: bool = True, log: Callable[[str], None] = print,
             desc: str = "distill", autocast: Callable[[], AbstractContextManager] = nullcontext,
             deadline: float | None = None, tail: bool = False) -> KDRun:
    """Train `params` (requires_grad already set) on the top-k KL to the teacher (`t_logp`, `t_idx`: one row per
    entry of `fit_rows`), AdamW with a linear warm-up and a cosine schedule; every cfg.eval_every steps the
    held-out next-token loss, `snapshot()` at each new best, and early stopping after cfg.patience evaluations
    without a new best of the training's own. `cfg` has steps, lr, weight_decay, warmup, batch_size, eval_every,
    patience and seed (DistillConfig, HealConfig); `deadline`: a time.perf_counter() after which it stops; `tail`:
    topk_kl's term for the teacher's mass outside its top k."""
    with autocast():
        before = mean_nll(model, held_ids, cfg.batch_size)
    run = KDRun(before, before, None, 0, "steps")
    # early stopping watches the training's own best: a run that starts above the starting loss (the warm-up's
    # first steps) and is still improving is not cut off for that
    trained_best, since_best = math.inf, 0
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=not progress)
    running, seen = 0.0, 0
    for step in range(1, cfg.steps + 1):
        rows = torch.randint(0, len(fit_rows), (cfg.batch_size,), generator=gen)
        ids = input_ids[[fit_rows[int(r)] for r in rows]].to(device)
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = kl_backward(model, ids, t_logp[rows].to(device), t_idx[rows].to(device), tail)
        if not math.isfinite(loss):
            log(f"{desc}: non-finite loss at step {step}; stopping")
            run.stopped = "non-finite loss"
            break
        opt.step()
        sched.step()
        release_memory(collect=False)  # as in teacher_topk: the step's temporaries back to the system
        running, seen, run.steps = running + loss, seen + 1, step
        bar.update(1)
        late = deadline is not None and time.perf_counter() > deadline
        if step % cfg.eval_every == 0 or step == cfg.steps or late:
            with autocast():
                nll = mean_nll(model, held_ids, cfg.batch_size)
            run.curve.append({"step": step, "train_kl": running / seen, "heldout_nll": nll})
            bar.set_postfix(kl=f"{running / seen:.4f}", heldout=f"{nll:.4f}")
            running, seen = 0.0, 0
            if nll < run.best:
                run.best, run.best_state = nll, snapshot()
            if nll < trained_best:
                trained_best, since_best = nll, 0
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    run.stopped = "patience"
                    break
        if late:
            run.stopped = "time budget"
            break
    bar.close()
    return run


def distill(model: torch.nn.Module, input_ids: torch.Tensor, removed: list[int], operators: dict[Pair, Operator],
            heldout: frozenset[int], cfg: DistillConfig, progress: bool = True, log=print) -> DistillResult:
    """Train the residual operators of `operators` (cuts of `removed`, dense indices) on the fit windows.

    Operators that are not residual ghosts (fold_down, identity, scalar) are kept as they are and not
    trained. The model is restored when this returns; nothing but the returned operators changes.
    """
    t0 = time.perf_counter()
    trainable = {c: op for c, op in operators.items() if op.kind in ("full", "lowrank")}
    if cfg.steps == 0 or not trainable:
        return DistillResult(dict(operators), "training-free", float("nan"), float("nan"), 0, 0.0)
    N = input_ids.shape[0]
    fit_rows = [r for r in range(N) if r not in heldout]
    held_rows = sorted(heldout)
    if not held_rows or not fit_rows:
        raise GhostedError("distillation needs held-out windows for early stopping: set --holdout > 0")
    t_logp, t_idx = teacher_topk(model, input_ids[fit_rows], cfg.top_k, cfg.batch_size, progress)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with temporarily_pruned(model, removed, operators) as m:
            params = ghost_params(m)
            for p in params:
                p.requires_grad_(True)
            run = kd_train(m, params, input_ids, fit_rows, input_ids[held_rows], t_logp, t_idx, cfg,
                           lambda: _read_operators(m, removed, trainable), progress, log)
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    kept = "distilled" if run.best_state is not None else "training-free"
    out = dict(operators)
    if kept == "distilled":
        out.update(run.best_state)
    log(f"distill: held-out loss {run.before:.4f} -> {run.best:.4f} after {run.steps} steps; keeping the {kept} "
        "operators")
    return DistillResult(out, kept, run.before, run.best, run.steps, time.perf_counter() - t0, run.curve)


__all__ = ["DistillConfig", "DistillResult", "KDRun", "distill", "ghost_params", "kd_train", "kl_backward",
           "teacher_topk", "topk_kl"]
