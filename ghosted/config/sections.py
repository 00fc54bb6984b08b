"""The sections that decide a pruned model: `calibration:` (the statistics' windows) and `prune:` (the plan)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ghosted.config.typed import (
    GUARDS,
    MAX_BATCH,
    MAX_LAYERS,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_WINDOWS,
    VARIANTS,
    _typed,
    between,
    build,
    option,
)
from ghosted.errors import GhostedError, brief

MAX_CALIB_TOKENS = 1 << 27  # n x seq_len: 1 GiB of token ids
MAX_GRID = 16  # ridge values the guard tries
MAX_RANK = 1 << 16  # a low-rank ghost's rank (the model's hidden size bounds it further)


def _select_help() -> str:
    from ghosted.method.selection import SELECTION

    return f"{', '.join(SELECTION.names())} (default {{default}})"


def _recovery_help() -> str:
    from ghosted.method.recovery import RECOVERY

    return f"{', '.join(RECOVERY.names())} (default {{default}})"


def _fold_help() -> str:
    from ghosted.method.fold import FOLDS

    return f"foldable: auto (the guard picks), {', '.join(FOLDS)} (default {{default}})"


def _policy_help() -> str:
    from ghosted.method.policies import help_text

    return help_text()


@dataclass(frozen=True)
class CalibrationConfig:
    """`calibration:` the token windows the statistics are taken on (ghosted calibrate)."""

    source: str = option("passages", "passages, wiki, ptb, ptb-train, a .txt/.jsonl file, hf:NAME:SPLIT:FIELD, or a "
                                     "mixture A+B with an equal share of windows from each (default {default})",
                         name="calib-source")
    n: int = option(32, "number of calibration sequences (default {default})", name="n-seqs",
                    bounds=between(1, MAX_WINDOWS))
    seq_len: int = option(512, "tokens per sequence (default {default})",
                          bounds=between(2, MAX_SEQ_LEN, note="at most the model's positions"))
    seed: int = option(0, "seed for the document shuffle (default {default})", bounds=between(0, MAX_SEED))

    def __post_init__(self) -> None:
        _typed(self, "calibration")
        if not self.source:
            raise GhostedError("calibration.source must name a text source, e.g. passages")
        if self.n * self.seq_len > MAX_CALIB_TOKENS:
            raise GhostedError(f"--n-seqs x --seq-len = {self.n} x {self.seq_len} = {self.n * self.seq_len} tokens, over "
                               f"the limit of {MAX_CALIB_TOKENS}: use fewer or shorter calibration windows")


_WHAT = "what to remove"


@dataclass(frozen=True)
class PruneConfig:
    """`prune:` everything that decides the pruned model. Rejects unknown keys and bad combinations."""

    remove: int | None = option(None, "number of layers to remove (chosen by --select)", group=_WHAT, one_of="layers",
                                bounds=between(1, MAX_LAYERS, note="below the model's layer count"))
    layers: str | int | None = option(None, "explicit dense layer indices, e.g. 13-18 or 13,15,20", group=_WHAT,
                                      one_of="layers")
    select: str = option("angular", _select_help, group=_WHAT)
    recovery: str = option("ghost", _recovery_help)
    # None: the guard picks the ridge on held-out data from ridge_grid (ghost); 1e-6 for the other methods
    ridge: float | None = option(None, "relative ridge (lambda = ridge * tr(X^T X)/d); default: chosen on held-out "
                                       "data from --ridge-grid", bounds=between(0))
    ridge_grid: tuple[float, ...] = option((1e-6, 1e-2), f"ridge values the guard tries, 1 to {MAX_GRID} of them "
                                                         "(default {default})", bounds=between(0))
    norm_features: bool = option(False, "ghost that also maps the scale-free state h/rms(h) (one more d x d matrix "
                                        "per cut)", method="ghost")
    token_shift: bool = option(False, "with --norm-features: also map the previous token's scale-free state (one "
                                      "more d x d matrix per cut; generation keeps one d-vector per token and cut on "
                                      "its cache)", method="ghost")
    exportable: bool = option(False, "ghost in the form llama.cpp runs (`ghosted export --gguf` writes it as one "
                                     "deci layer per cut): h + n(h) W_n + b, n(h) = h/rms(h), one map for every token "
                                     "(implies --norm-features)", method="ghost")
    rank: int | None = option(None, "low-rank ghost I + U V^T of this rank", method="ghost",
                              bounds=between(1, MAX_RANK, note="at most the model's hidden size"))
    variant: str = option("rotate", f"LinearPatch variant: {', '.join(VARIANTS)} (default {{default}})",
                          method="linearpatch")
    fold: str = option("auto", _fold_help, method="foldable")
    token_policy: str = option("auto", _policy_help)  # auto: the guard picks among the registered policies
    holdout: float = option(0.25, "fraction of calibration windows held out (default {default})",
                            bounds=between(0, 1, high_open=True))
    guard: str = option("loss", f"held-out check: {', '.join(GUARDS)} (default {{default}})")
    shortlist: int = option(4, "blocks the ghost selection compares by held-out loss, at most (a model with fewer "
                               "candidate blocks compares them all; default {default})", bounds=between(1, 1024))
    batch_size: int = option(4, "sequences per forward pass, at most (a calibration pass takes fewer at once when "
                                "their states would pass 64 MiB; default {default})", bounds=between(1, MAX_BATCH))
    # Training is opt-in: the product's default stays training-free.
    distill: int = option(0, "after the training-free solve, train only the ghosts this many steps against the "
                             "dense model (kept only if the held-out loss drops; default 0: training-free)",
                          method="ghost", metavar="STEPS", bounds=between(0, MAX_STEPS))
    # Small: the fit windows are few, and a large step overfits them.
    distill_lr: float = option(2e-5, "distillation learning rate (default {default})", method="ghost",
                               bounds=between(0, 1, low_open=True))

    def __post_init__(self) -> None:
        _typed(self, "prune")
        if (self.remove is None) == (self.layers is None):
            raise GhostedError("give exactly one of --remove K or --layers LIST")
        if isinstance(self.layers, int):  # `layers: 13` in YAML
            object.__setattr__(self, "layers", str(self.layers))
        self._check_names()
        self._check_numbers()
        self._check_method_options()

    def _check_names(self) -> None:
        from ghosted.method.fold import FOLDS
        from ghosted.method.policies import get_policy
        from ghosted.method.recovery import RECOVERY
        from ghosted.method.selection import SELECTION

        SELECTION.get(self.select)
        RECOVERY.get(self.recovery)
        get_policy(self.token_policy)
        if self.guard not in GUARDS:
            raise GhostedError(f"unknown guard {brief(self.guard)}: use {', '.join(GUARDS)}")
        if self.variant not in VARIANTS:
            raise GhostedError(f"--variant (prune.variant) must be {' or '.join(VARIANTS)}, got {brief(self.variant)}")
        if self.fold != "auto" and self.fold not in FOLDS:
            raise GhostedError(f"--fold (prune.fold) must be auto or one of {', '.join(FOLDS)}, got {brief(self.fold)}")

    def _check_numbers(self) -> None:
        """Each number's range is its field's Bounds (checked by _typed); the list's length is checked here."""
        if not self.ridge_grid or len(self.ridge_grid) > MAX_GRID:
            raise GhostedError(f"--ridge-grid (prune.ridge_grid) needs values >= 0, 1 to {MAX_GRID} of them, got "
                               f"{brief(list(self.ridge_grid))}")

    def check_model(self, num_layers: int, hidden_size: int) -> None:
        """The limits that depend on the model, checked once it is known and before any calibration pass."""
        if self.remove is not None and not 1 <= self.remove < num_layers:
            raise GhostedError(f"--remove must be between 1 and {num_layers - 1} for a {num_layers}-layer model, "
                               f"got {self.remove}")
        if self.rank is not None and self.rank > hidden_size:
            raise GhostedError(f"--rank (prune.rank) {self.rank} is above this model's hidden size {hidden_size}: "
                               f"use --rank {hidden_size} or less (or drop --rank for the full ghost)")

    def _check_method_options(self) -> None:
        if self.exportable:
            from ghosted.method.policies import get_policy

            if self.recovery != "ghost":
                raise GhostedError(f"--exportable (prune.exportable) is a ghost option: it needs --recovery ghost, "
                                   f"not {brief(self.recovery)} (foldable, scalar, replaceme and none export as they are)")
            if self.rank is not None or self.token_shift:
                raise GhostedError("an exportable ghost reads h/rms(h) of its own token only: drop "
                                   + ("--rank" if self.rank is not None else "--token-shift"))
            if get_policy(self.token_policy).sink_shift:
                raise GhostedError(f"token policy {self.token_policy} gives position 0 its own map, which llama.cpp "
                                   f"cannot run: use drop, anchor, all or auto with --exportable")
            object.__setattr__(self, "norm_features", True)  # the exportable form is the norm features' map alone
        if self.norm_features and self.recovery != "ghost":
            raise GhostedError(f"--norm-features (prune.norm_features) is a ghost option: it needs --recovery ghost, "
                               f"not {brief(self.recovery)}")
        if self.norm_features and self.rank is not None:
            raise GhostedError("a low-rank ghost has no norm features: drop --rank or --norm-features")
        if self.token_shift and not self.norm_features:
            raise GhostedError("--token-shift (prune.token_shift) extends the norm features: add --norm-features")
        if self.distill and self.recovery != "ghost":
            raise GhostedError(f"--distill trains ghost operators: it needs --recovery ghost, not {brief(self.recovery)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PruneConfig:
        return build(cls, d, "prune")
