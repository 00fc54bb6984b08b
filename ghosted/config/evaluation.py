"""The sections that judge a model: `eval:` (quality), the efficiency measurement, and `gate:` (the bar)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghosted.config.typed import (
    MAX_BATCH,
    MAX_SEQ_LEN,
    MAX_WINDOWS,
    PPL_SOURCES_HELP,
    _typed,
    between,
    build,
    option,
    parse_names,
    twice,
)
from ghosted.errors import GhostedError, brief

MAX_ITEMS = 10**9  # --limit: more than any task holds
MAX_TIMINGS = 16  # efficiency batch sizes
MAX_NEW_TOKENS = 65_536
MAX_REPEATS = 1_000
MAX_PPL_RATIO = 1_000.0  # a gate that lets a model 1000x worse than the dense one pass is no gate
MAX_RETAINED = 2.0  # a pruned model does not keep twice the dense model's accuracy


def check_tasks(tasks: tuple[str, ...]) -> None:
    from ghosted.evaluation.zeroshot import SUPPORTED_TASKS

    for name in tasks:
        if name not in SUPPORTED_TASKS:
            close = difflib.get_close_matches(str(name)[:100], SUPPORTED_TASKS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GhostedError(f"unknown task {brief(name)}; {hint}supported: {', '.join(SUPPORTED_TASKS)} (or 'none')")
    if len(set(tasks)) != len(tasks):
        raise GhostedError(f"--tasks names a task twice ({brief(twice(tasks))}); list each task once")


def _is_file(name: str) -> bool:
    try:
        return Path(name).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for a path, or with a NUL: not a file
        return False


def check_sources(sources: tuple[str, ...]) -> None:
    from ghosted.corpora import SHIPPED_SOURCES

    for s in sources:
        if s not in SHIPPED_SOURCES and not s.startswith("hf:") and not _is_file(s):
            raise GhostedError(f"unknown perplexity source {brief(s)}: use {PPL_SOURCES_HELP} (or 'none')")
    if len(set(sources)) != len(sources):
        raise GhostedError(f"--ppl names a source twice ({brief(twice(sources))}); list each source once")


def _default_tasks() -> tuple[str, ...]:
    from ghosted.evaluation.zeroshot import DEFAULT_TASKS

    return tuple(DEFAULT_TASKS)


@dataclass(frozen=True)
class EvalSettings:
    """`eval:` what quality evaluation runs: perplexity sources and zero-shot tasks, and their sizes."""

    tasks: tuple[str, ...] = option(help="zero-shot tasks, comma-separated (default: {default}; 'none' for no "
                                         "zero-shot)", default_factory=_default_tasks, text=True)
    ppl: tuple[str, ...] = option(("wiki", "ptb"), f"perplexity sources, comma-separated: {PPL_SOURCES_HELP} "
                                                   "(default {default}; 'none' to skip)", text=True)
    limit: int | None = option(None, "first N items of each task; a task with fewer items is evaluated whole, and "
                                     "the results record the items scored (default: all)",
                               bounds=between(1, MAX_ITEMS))
    ppl_windows: int = option(32, "windows per perplexity source, at most: a shorter source is scored whole, and "
                                  "the results record the windows scored (default {default})",
                              bounds=between(1, MAX_WINDOWS))
    seq_len: int = option(512, "tokens per perplexity window (default {default})",
                          bounds=between(2, MAX_SEQ_LEN, note="at most the model's positions"))
    batch_size: int = option(8, "sequences per forward pass in evaluation (default {default})",
                             bounds=between(1, MAX_BATCH))

    def __post_init__(self) -> None:
        _typed(self, "eval")
        object.__setattr__(self, "tasks", parse_names(self.tasks) or ())
        object.__setattr__(self, "ppl", parse_names(self.ppl) or ())
        check_tasks(self.tasks)
        check_sources(self.ppl)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvalSettings:
        return build(cls, d, "eval")


@dataclass(frozen=True)
class EfficiencySettings:
    """`efficiency:` inputs of `ghosted eval --efficiency` (random prompts, greedy decoding)."""

    batch_sizes: tuple[int, ...] = option((1, 8), f"decode batch sizes of the efficiency timings, 1 to {MAX_TIMINGS} "
                                                  "of them (default {default})",
                                          name="efficiency-batch-sizes", bounds=between(1, MAX_BATCH))
    prompt_len: int = option(128, "prompt tokens for the timings (default {default})",
                             bounds=between(1, MAX_SEQ_LEN, note="with --new-tokens within the model's positions"))
    new_tokens: int = option(32, "generated tokens for decode speed (default {default})",
                             bounds=between(2, MAX_NEW_TOKENS))
    repeats: int = option(3, "timed runs per measurement, median kept (default {default})",
                          bounds=between(1, MAX_REPEATS))

    def __post_init__(self) -> None:
        _typed(self, "efficiency")
        if not self.batch_sizes or len(self.batch_sizes) > MAX_TIMINGS:
            raise GhostedError(f"--efficiency-batch-sizes (efficiency.batch_sizes) needs 1 to {MAX_TIMINGS} batch "
                               f"sizes, got {brief(list(self.batch_sizes))}")


@dataclass(frozen=True)
class GateConfig:
    """`gate:` the quality bar a pruned checkpoint must clear before it can become the champion."""

    max_ppl_ratio: float | None = option(2.0, "pruned / dense perplexity, every source", cli=False,
                                         bounds=between(0, MAX_PPL_RATIO, low_open=True))
    min_retained_acc: float | None = option(0.9, "pruned / dense zero-shot average", cli=False,
                                            bounds=between(0, MAX_RETAINED, low_open=True))
    rank_by: str = option("wiki", "the perplexity source whose ratio ranks candidates (lower is better)", cli=False)
    acc_metric: str = option("acc_norm", "key of the zero-shot `average` block (acc_norm, acc where a task has none)",
                             cli=False)

    def __post_init__(self) -> None:
        _typed(self, "gate")
        if not self.rank_by:
            raise GhostedError("gate.rank_by must name a perplexity source, e.g. wiki")
        if not self.acc_metric:
            raise GhostedError("gate.acc_metric must name a metric, e.g. acc_norm")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GateConfig:
        return build(cls, d, "gate")
