"""The streaming accumulator of one calibration pass: fed one batch of boundary states at a time (by either
traversal), it adds each cut's float64 sums per token group and the score tables; activations are never kept."""

from __future__ import annotations

import torch

from ghosted._remote.modeling_ghosted import previous_states, scale_free
from ghosted.calibration.plan import CapturePlan, CaptureResult
from ghosted.errors import GhostedError
from ghosted.method.policies import TokenPolicy
from ghosted.method.sums import F64, GramStore, Pair, PairSums, orthonormal_mixer


def _shift_features(X: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """[B, T, 2d] float64: n(X) and the previous token's n(X) as a token-shift ghost reads it at inference, with
    the position ids transformers derives from the attention mask."""
    N = scale_free(X.to(F64))
    pid = (am.long().cumsum(-1) - 1).clamp_min(0)
    return torch.cat([N, previous_states(N, pid)], -1)


class Accumulator:
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
