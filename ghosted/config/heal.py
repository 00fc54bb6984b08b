"""`heal:` knowledge distillation of a pruned checkpoint from its dense base (`ghosted heal`, ghosted.healing)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ghosted.config.evaluation import check_sources
from ghosted.config.typed import (
    MAX_BATCH,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_WINDOWS,
    _typed,
    between,
    build,
    option,
    parse_names,
    twice,
)
from ghosted.errors import GhostedError, brief

# What healing can train (ghosted.healing.train): one name each, in the order a record lists them.
HEAL_PARTS = ("lora", "adjacent", "ghosts")
MAX_LORA_RANK = 1 << 12
MAX_MINUTES = 7 * 24 * 60.0
_TRAIN_HELP = ("what trains, comma-separated: lora (adapters on the linears of every other kept layer, merged into "
               "the weights at the end), adjacent (every weight of the kept layer just before and just after each "
               "cut), ghosts (the ghost parameters; an exportable ghost's identity map and sink detector stay fixed) "
               "(default {default})")


@dataclass(frozen=True)
class HealConfig:
    """`heal:` the recipe of `ghosted heal`: distil a pruned checkpoint from its dense base on training text."""

    # the pipeline's switch (a heal stage after fuse); `ghosted heal` always heals with this recipe
    enabled: bool = option(False, "the pipeline heals the fused checkpoint", cli=False)
    train: tuple[str, ...] = option(HEAL_PARTS, _TRAIN_HELP, text=True)
    steps: int = option(240, "optimizer steps, at most (default {default})", bounds=between(1, MAX_STEPS))
    lr: float = option(2e-4, "AdamW learning rate, linear warm-up then cosine (default {default})",
                       bounds=between(0, 1, low_open=True))
    weight_decay: float = option(0.0, "AdamW weight decay (default {default})", bounds=between(0, 1))
    warmup: float = option(0.05, "fraction of the steps with a linear warm-up (default {default})",
                           bounds=between(0, 1, high_open=True))
    lora_rank: int = option(8, "rank of the LoRA adapters (default {default})",
                            bounds=between(1, MAX_LORA_RANK, note="at most the smaller side of each linear"))
    source: str = option("passages+ptb-train", "healing text: a training split (passages, ptb-train), a mixture A+B, "
                                               "a .txt/.jsonl file or hf:NAME:SPLIT:FIELD; never an evaluation source "
                                               "(default {default})", name="source")
    n: int = option(96, "healing windows, the held-out ones included (default {default})", name="windows",
                    bounds=between(2, MAX_WINDOWS))
    seq_len: int = option(512, "tokens per healing window (default {default})",
                          bounds=between(2, MAX_SEQ_LEN, note="at most the model's positions"))
    batch_size: int = option(2, "windows per step (default {default})", bounds=between(1, MAX_BATCH))
    top_k: int = option(32, "teacher log-probs cached per token (default {default})", bounds=between(1, 1024))
    holdout: float = option(0.125, "fraction of the healing windows held out to judge it: the last ceil(fraction x "
                                   "windows), at least one (default {default})",
                            bounds=between(0, 1, low_open=True, high_open=True))
    eval_every: int = option(10, "steps between held-out evaluations (default {default})",
                             bounds=between(1, MAX_STEPS))
    patience: int = option(3, "held-out evaluations without a new best before stopping (default {default})",
                           bounds=between(1, MAX_STEPS))
    seed: int = option(1, "seed of the document shuffle, the adapters' start and the batches (default {default})",
                       bounds=between(0, MAX_SEED))
    device: str = option("cpu", "cpu (default), cuda (bf16 autocast), cuda:1, ...")
    max_minutes: float | None = option(30.0, "wall-time budget of the whole heal: training stops in time to write "
                                             "the checkpoint (default {default}; null: none)",
                                       bounds=between(0, MAX_MINUTES, low_open=True))
    eval_sources: tuple[str, ...] = option(("wiki", "ptb"), "evaluation texts no healing window may overlap "
                                                           "(default {default})", text=True)

    def __post_init__(self) -> None:
        _typed(self, "heal")
        train = parse_names(self.train) or ()
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "eval_sources", parse_names(self.eval_sources) or ())
        if not train:
            raise GhostedError(f"--train (heal.train) names nothing to train: use some of {', '.join(HEAL_PARTS)}")
        bad = next((t for t in train if t not in HEAL_PARTS), None)
        if bad is not None:
            raise GhostedError(f"--train (heal.train): unknown part {brief(bad)}; use {', '.join(HEAL_PARTS)}")
        if len(set(train)) != len(train):
            raise GhostedError(f"--train (heal.train) names {brief(twice(train))} twice; list each part once")
        if not self.eval_sources:
            raise GhostedError("--eval-sources (heal.eval_sources) names no evaluation text: healing is checked "
                               "against the texts you evaluate on (default wiki,ptb)")
        check_sources(self.eval_sources)
        if not self.source:
            raise GhostedError("--source (heal.source) must name a training text, e.g. passages+ptb-train")
        if self.n * self.seq_len > 1 << 27:
            raise GhostedError(f"--windows x --seq-len = {self.n * self.seq_len} tokens, over the limit of {1 << 27}: "
                               "use fewer or shorter windows")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> HealConfig:
        return build(cls, d, "heal")
