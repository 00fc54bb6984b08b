"""The sections that judge a model: `eval:` (quality), the efficiency measurement, and `gate:` (the bar)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghosted.config.typed import PPL_SOURCES_HELP, _typed, _whole, build, option, parse_names, twice
from ghosted.errors import GhostedError, brief


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
    limit: int | None = option(None, "first N items of each task (default: all)")
    ppl_windows: int = option(32, "windows per perplexity source (default {default})")
    seq_len: int = option(512, "tokens per perplexity window (default {default})")
    batch_size: int = option(8, "sequences per forward pass in evaluation (default {default})")

    def __post_init__(self) -> None:
        _typed(self, "eval")
        object.__setattr__(self, "tasks", parse_names(self.tasks) or ())
        object.__setattr__(self, "ppl", parse_names(self.ppl) or ())
        check_tasks(self.tasks)
        check_sources(self.ppl)
        if self.limit is not None:
            _whole(self.limit, 1, "--limit (eval.limit)")
        _whole(self.ppl_windows, 1, "--ppl-windows (eval.ppl_windows)")
        _whole(self.seq_len, 2, "--seq-len (eval.seq_len)")
        _whole(self.batch_size, 1, "--batch-size (eval.batch_size)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> EvalSettings:
        return build(cls, d, "eval")


@dataclass(frozen=True)
class EfficiencySettings:
    """`efficiency:` inputs of `ghosted eval --efficiency` (random prompts, greedy decoding)."""

    batch_sizes: tuple[int, ...] = option((1, 8), "decode batch sizes of the efficiency timings (default {default})",
                                          name="efficiency-batch-sizes")
    prompt_len: int = option(128, "prompt tokens for the timings (default {default})")
    new_tokens: int = option(32, "generated tokens for decode speed (default {default})")
    repeats: int = option(3, "timed runs per measurement, median kept (default {default})")

    def __post_init__(self) -> None:
        _typed(self, "efficiency")
        _whole(self.prompt_len, 1, "--prompt-len")
        _whole(self.new_tokens, 2, "--new-tokens")
        _whole(self.repeats, 1, "--repeats")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise GhostedError(f"efficiency batch sizes must be whole numbers >= 1, got {brief(self.batch_sizes)}")


@dataclass(frozen=True)
class GateConfig:
    """`gate:` the quality bar a pruned checkpoint must clear before it can become the champion."""

    max_ppl_ratio: float | None = option(2.0, "pruned / dense perplexity, every source", cli=False)
    min_retained_acc: float | None = option(0.9, "pruned / dense zero-shot average", cli=False)
    rank_by: str = option("wiki", "the perplexity source whose ratio ranks candidates (lower is better)", cli=False)
    acc_metric: str = option("acc_norm", "key of the zero-shot `average` block (acc_norm, acc where a task has none)",
                             cli=False)

    def __post_init__(self) -> None:
        _typed(self, "gate")
        for name in ("max_ppl_ratio", "min_retained_acc"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise GhostedError(f"gate.{name} must be a number > 0 or null, got {brief(v)}")
        if not self.rank_by:
            raise GhostedError("gate.rank_by must name a perplexity source, e.g. wiki")
        if not self.acc_metric:
            raise GhostedError("gate.acc_metric must name a metric, e.g. acc_norm")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> GateConfig:
        return build(cls, d, "gate")
