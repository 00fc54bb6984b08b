"""The quality gate, pure: evaluation results in, verdict and reasons out (no MLflow, no files).

- every perplexity source in both results: pruned PPL / dense PPL <= max_ppl_ratio;
- retained accuracy = pruned zero-shot average / dense average (`acc_metric`) >= min_retained_acc;
- every number a check uses must be finite and positive (a perplexity of -1, 0, inf or nan, or an accuracy of
  0, is a broken evaluation, not a good model); a check whose numbers are missing fails; a threshold set to None
  skips its check.

`beats` is the champion rule: whether a gate-passing candidate should replace the current champion (only runs of the
same evaluation protocol are ranked against each other).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ghosted.evaluation.provenance import PROTOCOL_KEY

if TYPE_CHECKING:  # the config dataclass lives with the other settings; the gate only reads its fields
    from ghosted.config import GateConfig

FINGERPRINT_KEY = "base_fingerprint"


def _number(v: Any) -> float | None:
    """v as a float if it is a JSON number (bools are not), else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _usable(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def perplexities(results: Mapping[str, Any]) -> dict[str, float]:
    """{source: ppl} from a `ghosted eval` results JSON, every numeric value kept (also impossible ones)."""
    out: dict[str, float] = {}
    for src, v in (results.get("ppl") or {}).items():
        x = _number(v.get("ppl")) if isinstance(v, Mapping) else None
        if x is not None:
            out[src] = x
    return out


def zeroshot_average(results: Mapping[str, Any], metric: str) -> float | None:
    """The zero-shot `average[metric]` of a results JSON, or None when it is not a number."""
    avg = (results.get("zeroshot") or {}).get("average") or {}
    return _number(avg.get(metric)) if isinstance(avg, Mapping) else None


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and the numbers behind it (ratios only where both numbers are usable)."""

    passed: bool
    reasons: tuple[str, ...]
    ppl_ratio: dict[str, float]
    retained_acc: float | None
    rank_value: float | None  # ppl_ratio[rank_by]: lower is better

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _impossible(what: str, x: float) -> str:
    return f"{what} is {x!r}: not a finite positive number (a broken evaluation)"


def apply_gate(dense: Mapping[str, Any], pruned: Mapping[str, Any], cfg: GateConfig) -> Verdict:
    """Compare the pruned model's evaluation with the dense one's under the thresholds in cfg."""
    dp, pp = perplexities(dense), perplexities(pruned)
    reasons: list[str] = []
    bad: set[str] = set()
    for label, table in (("dense", dp), ("pruned", pp)):
        for s, x in table.items():
            if not _usable(x):
                reasons.append(_impossible(f"{label} {s} perplexity", x))
                bad.add(s)
    ratios = {s: pp[s] / dp[s] for s in dp if s in pp and s not in bad}
    if cfg.max_ppl_ratio is not None:
        if not ratios and not bad:
            reasons.append("no perplexity source in both metrics files")
        for s, r in ratios.items():
            if not r <= cfg.max_ppl_ratio:
                reasons.append(f"{s} perplexity ratio {r:.3f} > max_ppl_ratio {cfg.max_ppl_ratio}")
    da, pa = zeroshot_average(dense, cfg.acc_metric), zeroshot_average(pruned, cfg.acc_metric)
    retained = None
    if da is not None and pa is not None:
        acc_bad = [(lbl, x) for lbl, x in (("dense", da), ("pruned", pa)) if not (_usable(x) and x <= 1)]
        if acc_bad:
            # Accuracy lives in (0, 1]; reported whatever the threshold, as the ratio is meaningless.
            reasons += [f"{lbl} zero-shot average {cfg.acc_metric} is {x!r}: not a number in (0, 1]"
                        for lbl, x in acc_bad]
        else:
            retained = pa / da
    if cfg.min_retained_acc is not None:
        if retained is None and (da is None or pa is None):
            reasons.append(f"no zero-shot average {cfg.acc_metric} in both metrics files")
        elif retained is not None and not retained >= cfg.min_retained_acc:
            reasons.append(f"retained accuracy {retained:.3f} < min_retained_acc {cfg.min_retained_acc}")
    rank = ratios.get(cfg.rank_by)
    if rank is None and cfg.rank_by not in bad:
        reasons.append(f"no {cfg.rank_by} perplexity in both metrics files to rank by (gate.rank_by)")
    return Verdict(not reasons, tuple(reasons), ratios, retained, rank)


def gate_report(verdict: Verdict, cfg: GateConfig, dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict:
    """gate.json: the verdict and the headline numbers (one compact row in `dvc metrics show`)."""
    def headline(doc: Mapping[str, Any]) -> dict:
        ppl = {s: (x if math.isfinite(x) else str(x)) for s, x in perplexities(doc).items()}  # JSON has no inf/nan
        acc = zeroshot_average(doc, cfg.acc_metric)
        return {"ppl": ppl, cfg.acc_metric: acc if acc is None or math.isfinite(acc) else str(acc)}

    return {"passed": verdict.passed, "ppl_ratio": verdict.ppl_ratio,
            "retained_acc": verdict.retained_acc, "dense": headline(dense), "pruned": headline(pruned),
            "rank_by": cfg.rank_by, "rank_value": verdict.rank_value,
            "thresholds": {"max_ppl_ratio": cfg.max_ppl_ratio, "min_retained_acc": cfg.min_retained_acc,
                           "acc_metric": cfg.acc_metric},
            "reasons": list(verdict.reasons)}


def beats(candidate: Mapping[str, str], champion: Mapping[str, str] | None) -> tuple[bool, str]:
    """Whether a gate-passing candidate should take the alias from the champion; both as registry tags.

    Better means: no champion; or a different base fingerprint (a new base supersedes the old one: ratios
    against different dense models are not comparable); or, on the same base and the same evaluation protocol
    (`protocol_sha256`, absent on both for metrics without provenance), a lower `rank_value` on the same
    `rank_by`, ties broken by higher `retained_acc`. Numbers measured on another protocol are not compared: the
    candidate does not take the alias, and the reason says so.
    """
    if champion is None:
        return True, "first version to pass the gate"
    if candidate.get(FINGERPRINT_KEY) != champion.get(FINGERPRINT_KEY):
        return True, "new base model (fingerprint differs from the champion's)"
    cp, hp = candidate.get(PROTOCOL_KEY), champion.get(PROTOCOL_KEY)
    if cp != hp:
        return False, (f"the champion was measured on another protocol ({_protocol(hp)}; this version: "
                       f"{_protocol(cp)}): their numbers do not compare")
    h = _float(champion.get("rank_value"))
    if candidate.get("rank_by") != champion.get("rank_by") or h is None:
        return True, "the champion was not ranked by the same perplexity source"
    rank_by = candidate["rank_by"]
    c = float(candidate["rank_value"])
    if c < h:
        return True, f"lower {rank_by} PPL ratio ({c:.4f} < {h:.4f})"
    ca, ha = _float(candidate.get("retained_acc")), _float(champion.get("retained_acc"))
    if c == h and ca is not None and (ha is None or ca > ha):
        return True, f"same {rank_by} PPL ratio, higher retained accuracy ({ca:.4f})"
    return False, f"not better than the champion: {rank_by} PPL ratio {c:.4f} >= {h:.4f}"


def _protocol(sha: str | None) -> str:
    return f"protocol_sha256 {sha[:12]}" if sha else "no protocol recorded"


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None
