"""The healing text: windows of training splits only, a held-out split, and the check that none is evaluation text.

The windows are built as calibration windows are (corpora.build_calibration: the source or mixture, shuffled by the
seed); the last ceil(holdout x n) are held out (solve.fit.heldout_windows) and judge the healing. Before any model
runs, every window is compared with every window of each evaluation text cut the same way (the whole text, not
only the windows an evaluation scores): a healing window whose token sha256 (corpora.tokens_sha256) equals an
evaluation window's, or half of whose SPAN-token spans occur anywhere in an evaluation text, is refused in one
line. A few shared spans are only counted and recorded (PTB's training split shares some stock phrases with its
test split).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ghosted.config.heal import HealConfig
from ghosted.corpora import (
    Calibration,
    adds_bos,
    build_calibration,
    load_documents,
    make_windows,
    mixture_parts,
    tokens_sha256,
)
from ghosted.errors import GhostedError, brief
from ghosted.solve.fit import heldout_windows

EVALUATION_SPLITS = ("wiki", "ptb")  # corpora's evaluation texts: never healing text, whatever eval_sources says
SPAN = 32  # tokens: a healing window that shares this many consecutive tokens with an evaluation text shares text
REPEATS = 0.5  # a healing window with this fraction of its spans in an evaluation text is that text
_FIX = "heal on a training split (passages, ptb-train, or text of your own that is not evaluated)"


@dataclass(frozen=True)
class HealData:
    """The healing windows, which are held out, and what the overlap check found per evaluation text."""

    calib: Calibration
    heldout: list[int]
    overlap: dict[str, dict] = field(default_factory=dict)

    @property
    def fit(self) -> list[int]:
        held = set(self.heldout)
        return [r for r in range(self.calib.n) if r not in held]

    def record(self) -> dict:
        """The data part of a healed checkpoint's lineage."""
        c = self.calib
        return {"source": c.source, "windows": c.n, "seq_len": c.seq_len, "seed": c.seed, "sha256": c.sha256,
                "heldout_windows": len(self.heldout), "eval_overlap": self.overlap}


def refuse_evaluation_names(cfg: HealConfig) -> None:
    """heal.source naming an evaluation text (or part of one in a mixture) is refused before anything loads."""
    for part in mixture_parts(cfg.source):
        if part in EVALUATION_SPLITS or part in cfg.eval_sources:
            raise GhostedError(f"--source (heal.source) {brief(cfg.source)} includes {part!r}, an evaluation text: "
                               f"{_FIX}")


def _spans(tokens: list[int] | torch.Tensor, span: int) -> set[int]:
    """The hashes of every `span`-token run of a token sequence."""
    row = torch.as_tensor(tokens, dtype=torch.int64).numpy()
    return {hash(row[i:i + span].tobytes()) for i in range(max(0, len(row) - span + 1))}


def _windows(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """Every window of `docs` (corpora.make_windows); none when the text is shorter than one."""
    try:
        return make_windows(tokenizer, docs, seq_len)
    except GhostedError:  # shorter than one window: it holds no window an evaluation scores
        return torch.empty(0, seq_len, dtype=torch.long)


def check_overlap(tokenizer, ids: torch.Tensor, sources: tuple[str, ...]) -> dict[str, dict]:
    """Refuse healing windows `ids` [N, T] that are evaluation text (module docstring); what was found per source."""
    skip = int(adds_bos(tokenizer))  # a BOS in front of every window is no text
    span = min(SPAN, ids.shape[1] - skip)
    mine = {tokens_sha256(row): i for i, row in enumerate(ids)}
    my_spans = [_spans(row[skip:], span) for row in ids]
    found = {}
    for source in sources:
        docs = load_documents(source)
        ev = _windows(tokenizer, docs, ids.shape[1])
        for j, row in enumerate(ev):
            sha = tokens_sha256(row)
            if sha in mine:
                raise GhostedError(f"healing window {mine[sha]} equals window {j} of the evaluation text {source!r} "
                                   f"(sha256 {sha[:12]}): {_FIX}")
        # the text as one stream (windows of one span: at most a span's tokens at its end left out)
        theirs = _spans(_windows(tokenizer, docs, span + skip)[:, skip:].reshape(-1), span)
        shared = [len(s & theirs) for s in my_spans]
        worst = max(range(len(shared)), key=lambda i: shared[i] / max(len(my_spans[i]), 1))
        if my_spans[worst] and shared[worst] >= REPEATS * len(my_spans[worst]):
            raise GhostedError(f"healing window {worst} repeats the evaluation text {source!r} "
                               f"({shared[worst]} of its {len(my_spans[worst])} {span}-token spans): {_FIX}")
        found[source] = {"windows": int(ev.shape[0]), "seq_len": int(ev.shape[1]),
                         "sha256": tokens_sha256(ev), "shared_spans": sum(shared),
                         "windows_sharing": sum(1 for s in shared if s)}
    return found


def heal_data(tokenizer, cfg: HealConfig) -> HealData:
    """The healing windows of `cfg`, checked against its evaluation texts, with their held-out split."""
    refuse_evaluation_names(cfg)
    calib = build_calibration(tokenizer, cfg.source, cfg.n, cfg.seq_len, cfg.seed)
    overlap = check_overlap(tokenizer, calib.input_ids, cfg.eval_sources)
    return HealData(calib, sorted(heldout_windows(calib.n, cfg.holdout)), overlap)
