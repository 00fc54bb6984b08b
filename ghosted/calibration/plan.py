"""What one calibration pass collects (CapturePlan, a value decided before the pass) and what it gives back
(CaptureResult: the streaming sums of every cut and the score tables), with its safetensors file form."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ghosted.errors import GhostedError
from ghosted.hashing import file_sha256
from ghosted.io import discard_temp, new_temp_file, publish_file
from ghosted.json_io import parse_json
from ghosted.method.sums import GroupedSums, Pair, PairSums


@dataclass
class CapturePlan:
    """What one pass accumulates, decided before it runs."""

    pairs: list[Pair] = field(default_factory=list)  # cuts whose sums are accumulated
    full: bool = True  # X^T X and X^T Y (ghost, scalar, low-rank, ghost-aware selection)
    hadamard: bool = False  # rotated magnitude sums (LinearPatch rotate)
    mlp: bool = False  # MLP output of layer s-1 (ReplaceMe)
    scores: bool = False  # cosine / angular tables over all boundary pairs
    heldout: frozenset[int] = frozenset()  # window indices whose sums go to the held-out group
    # (metric, k, m): keep the sums of only the m blocks of length k that the score `metric` (angular |
    # cosine) ranks best after the first forward (capture_batch windows); the others' sums are never
    # accumulated (needs scores=True)
    shortlist: tuple[str, int, int] | None = None
    norm: bool = False  # with full: also the norm-feature sums (N = n(X)) of every cut (ghost --norm-features)
    shift: bool = False  # with norm: N = [n(X), the previous token's n(X)] (ghost --token-shift)


@dataclass
class CaptureResult(GroupedSums):
    """The sums of one pass: per cut and token group (combined by `sums`, see GroupedSums), and the score tables."""

    num_layers: int
    fit: dict[Pair, PairSums]  # tokens the policy keeps, fit windows
    heldout: dict[Pair, PairSums]  # tokens the policy keeps, held-out windows
    cos_sum: torch.Tensor | None  # [L+1, L+1] sum over tokens of cos(h_i, h_j)
    ang_sum: torch.Tensor | None  # [L+1, L+1] sum over tokens of arccos(cos)/pi
    score_tokens: int
    seconds: float = 0.0
    fit_left_out: dict[Pair, PairSums] = field(default_factory=dict)  # tokens the policy left out
    heldout_left_out: dict[Pair, PairSums] = field(default_factory=dict)
    offloaded_bytes: int = 0  # layerwise: the most bytes of states that were in offload files at once

    def mean_cos(self) -> torch.Tensor:
        """[L+1, L+1] mean cosine over the scored tokens."""
        return self.cos_sum / max(self.score_tokens, 1)

    def mean_angular(self) -> torch.Tensor:
        """[L+1, L+1] mean angular distance (arccos(cos) / pi) over the scored tokens."""
        return self.ang_sum / max(self.score_tokens, 1)

    def save(self, path: str | Path) -> str:
        """Write every sum to one safetensors file (small JSON metadata in its header), atomically; returns
        the file's sha256. No pickle: loading it back cannot run code."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        groups: dict[str, dict[str, dict]] = {}
        for group in _GROUPS:
            groups[group] = {}
            for (s, b), ps in getattr(self, group).items():
                key = f"{s}-{b}"
                groups[group][key] = {"d": ps.d, "n": ps.n, "trace_ref": ps.trace_ref}
                for f in dataclasses.fields(ps):
                    t = getattr(ps, f.name)
                    if isinstance(t, torch.Tensor):
                        tensors[f"{group}/{key}/{f.name}"] = t.detach().to("cpu").contiguous().clone()  # shared grams: own copies
        for name in ("cos_sum", "ang_sum"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().to("cpu").contiguous()
        meta = {"format": _FORMAT, "num_layers": self.num_layers, "score_tokens": self.score_tokens,
                "seconds": self.seconds, "groups": groups}
        tmp = new_temp_file(path)  # a marked temp: a killed save's is removed by the next writer into the folder
        try:
            save_file(tensors, str(tmp), metadata={"ghosted_capture": json.dumps(meta)})
            digest = file_sha256(tmp)
            publish_file(tmp, path)  # a half-written file never carries the final name; the usual mode
        finally:
            discard_temp(tmp)
        return digest

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None, device: str | torch.device = "cpu") -> CaptureResult:
        """Read a file written by save(). With `sha256`, refuse a file whose hash differs from it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise GhostedError(f"{path}: no such capture file")
        if sha256 is not None and file_sha256(path) != sha256:
            raise GhostedError(f"{path}: sha256 does not match the one recorded when it was written")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = parse_json((f.metadata() or {}).get("ghosted_capture", "null"), str(path), "capture file")
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                    raise GhostedError(f"{path} is not a capture written by CaptureResult.save")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as exc:  # a damaged or foreign file
            raise GhostedError(f"{path}: unreadable capture file ({exc})") from exc
        groups: dict[str, dict[Pair, PairSums]] = {}
        for group in _GROUPS:
            groups[group] = {}
            for key, info in meta["groups"][group].items():
                s, b = (int(x) for x in key.split("-"))
                ps = PairSums(int(info["d"]), int(info["n"]), trace_ref=info["trace_ref"])
                for f in dataclasses.fields(ps):
                    t = tensors.get(f"{group}/{key}/{f.name}")
                    if t is not None:
                        setattr(ps, f.name, t)
                groups[group][(s, b)] = ps
        return cls(int(meta["num_layers"]), groups["fit"], groups["heldout"], tensors.get("cos_sum"),
                   tensors.get("ang_sum"), int(meta["score_tokens"]), float(meta["seconds"]), groups["fit_left_out"],
                   groups["heldout_left_out"])


_FORMAT = "ghosted-capture/1"
_GROUPS = ("fit", "heldout", "fit_left_out", "heldout_left_out")


def mlp_layers(plan: CapturePlan) -> set[int]:
    """Layers whose MLP output the plan needs (layer s-1 of every cut, for ReplaceMe)."""
    return {s - 1 for s, _ in plan.pairs if s >= 1} if plan.mlp else set()


def validate_pairs(pairs: list[Pair], num_layers: int) -> None:
    for s, b in pairs:
        if not (0 <= s < b <= num_layers):
            raise GhostedError(f"cut ({s}, {b}) is outside the model's {num_layers} layers")


def needed_states(plan: CapturePlan, L: int) -> set[int]:
    """The boundary states hidden_states[i] a capture of `plan` must see."""
    needed: set[int] = set()
    for s, b in plan.pairs:
        needed |= {s, b}
    if plan.scores:
        needed |= set(range(L + 1))
    if not needed:
        raise GhostedError("nothing to capture: no cut and no scores requested")
    return needed
