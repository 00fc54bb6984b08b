"""The public Python API: what the `ghosted` commands do, as functions.

    params = ghosted.load_params("params.yaml")
    result = ghosted.prune("smollm2-135m", params, "out/ckpt")
    healed = ghosted.heal(result.out, params, "out/healed")
    quality = ghosted.evaluate(str(healed.out))

Each function takes typed settings (ghosted.config), checks its outputs before any work, and raises
GhostedError with a one-line reason. The CLI parses flags into the same settings and calls these. Torch and
transformers are imported only when a function runs, so `import ghosted` stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ghosted.config import (
    CalibrationConfig,
    CompareConfig,
    EfficiencySettings,
    EvalSettings,
    HealConfig,
    Params,
    PruneConfig,
)
from ghosted.config import load_params as _load_params
from ghosted.errors import GhostedError

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class PruneResult:
    """What `prune` wrote: the checkpoint folder, the dense layers removed, the layers left, and the solve's record."""

    out: Path
    removed_layers: list[int]
    num_layers: int
    recovery: str
    ghosts: int = 0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # the solve's meta (ridge, guard, ...)
    params: int | None = None  # every tensor the checkpoint stores (ghosts included; a head the fold untied)
    params_dense: int | None = None  # the dense model's parameters (tied embedding and head counted once)

    @property
    def params_ratio(self) -> float | None:
        """params / params_dense: above 1 - removed/layers where the fold untied the head (foldable)."""
        return self.params / self.params_dense if self.params and self.params_dense else None


def load_params(path: str | Path | None = None) -> Params:
    """Every section of a params file (YAML), typed and checked; None: all defaults."""
    return _load_params(path)


def _as_params(params: Params | str | Path | None) -> Params:
    if params is None or isinstance(params, (str, Path)):
        return _load_params(params)
    if not isinstance(params, Params):
        raise GhostedError(f"params: expected a Params (ghosted.load_params) or a params file, got "
                           f"{type(params).__name__}")
    return params


# --------------------------------------------------------------------------- the shared steps


def open_model(model: str, *, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
               layerwise: bool = False, offload_budget: int | None = None, log: Log = _nolog):
    """Load MODEL for pruning. `layerwise`: keep it in host memory and move one layer at a time to `device`;
    `offload_budget`: MiB of carried calibration states kept in memory (the rest go to temporary files)."""
    from ghosted.models import load_model

    t0 = time.perf_counter()
    if layerwise and device_map:
        raise GhostedError("--layerwise and --device-map are two ways to fit a large model: pick one")
    loaded = load_model(model, dtype=dtype, device="cpu" if layerwise else device, device_map=device_map)
    if layerwise:
        loaded.layerwise, loaded.capture_device = True, device
        if offload_budget is not None:
            if offload_budget < 0:
                raise GhostedError(f"--offload-budget must be >= 0 MiB, got {offload_budget}")
            loaded.offload_budget = offload_budget * 2**20
    elif offload_budget is not None:
        raise GhostedError("--offload-budget applies to --layerwise only")
    log(f"loaded {model} ({type(loaded.model).__name__}) in {time.perf_counter() - t0:.1f}s")
    return loaded


def calibration_for(loaded, settings: CalibrationConfig | None = None, folder: str | Path | None = None):
    """The calibration windows: a saved folder (`ghosted calibrate`) or built from `settings`."""
    from ghosted.checks import check_seq_len
    from ghosted.corpora import build_calibration, load_calibration

    if folder:
        calib = load_calibration(folder)
        check_seq_len(loaded.model.config, calib.seq_len, f"--calib {folder}: window length",
                      "make a calibration folder with shorter windows (`ghosted calibrate --seq-len`)")
        return calib
    c = settings or CalibrationConfig()
    check_seq_len(loaded.model.config, c.seq_len)
    return build_calibration(loaded.tokenizer, c.source, c.n, c.seq_len, c.seed)


def refuse_ghost_model(model: str) -> None:
    """Pruning a ghost checkpoint would drop its ghosts: refuse before loading anything."""
    from ghosted.checkpoint.meta import checkpoint_meta

    meta = checkpoint_meta(model)  # None where unreadable: the loader reports what is wrong with it
    if meta is not None and meta.has_ghosts:
        raise GhostedError(f"{model} is a ghost checkpoint: prune its dense base model instead")


def _prepare(model: str, params: Params, out: str | Path | None, force: bool, calibration: str | Path | None,
             log: Log, load: Mapping[str, Any]):
    """Outputs checked, then the model and its calibration windows loaded."""
    from ghosted.io_owned import check_out_dir

    if out is None:
        raise GhostedError("out: give the output folder")
    check_out_dir(out, force)
    refuse_ghost_model(model)
    loaded = open_model(model, log=log, **load)
    calib = calibration_for(loaded, params.calibration, calibration)
    log(f"calibration: {calib.n} x {calib.seq_len} tokens from {calib.source} (sha256 {calib.sha256[:12]})")
    return loaded, calib


# --------------------------------------------------------------------------- the commands


def prune(model: str, params: Params | str | Path | None = None, out: str | Path | None = None, *,
          calibration: str | Path | None = None, force: bool = False, progress: bool = True, log: Log = _nolog,
          **load: Any) -> PruneResult:
    """What `ghosted prune` does: load MODEL, calibrate, solve (params.prune), write the checkpoint to `out`.

    `calibration`: a folder from `ghosted calibrate` instead of params.calibration; `load`: open_model's options."""
    from ghosted.solve.solver import build_checkpoint, solve

    p = _as_params(params)
    if p.prune is None:
        raise GhostedError("give exactly one of --remove K or --layers LIST")
    loaded, calib = _prepare(model, p, out, force, calibration, log, load)
    from ghosted.checkpoint.format import param_counts

    sol = solve(loaded, calib, p.prune, progress=progress, log=log)
    dense = sum(t.numel() for t in loaded.model.parameters())  # before the in-place surgery; tied weights once
    meta = build_checkpoint(loaded, sol, calib.sha256, Path(out), force=force)
    return PruneResult(out=Path(out), removed_layers=list(sol.removed), num_layers=meta.num_layers,
                       recovery=p.prune.recovery, ghosts=len(meta.ghost_list), meta=sol.meta.to_dict(),
                       params=param_counts(Path(out))["params"], params_dense=dense)


def prune_template(params: Params) -> PruneConfig:
    """The `prune:` options every searched or compared plan copies (each plan sets its own layers)."""
    from ghosted.config import build

    template = {k: v for k, v in params.raw.get("prune", {}).items() if k not in ("remove", "layers")}
    if params.prune is not None and not params.raw.get("prune"):
        return replace(params.prune, remove=1, layers=None)
    return build(PruneConfig, {**template, "remove": 1}, "prune")


def search(model: str, params: Params | str | Path | None, out: str | Path, *, calibration: str | Path | None = None,
           force: bool = False, progress: bool = True, log: Log = _nolog, **load: Any) -> dict:
    """What `ghosted search` does: the most layers whose pruned model passes params.gate (or, with search.target,
    the best plan within the budget, passing or not); writes OUT/search.json, the report and (when a plan was
    chosen) OUT/checkpoint. Returns the search document (`chosen` None: none passed; `chosen.passed`)."""
    from ghosted.solve.search import run_search, write_search

    t0 = time.perf_counter()
    p = _as_params(params)
    template = prune_template(p)
    if not p.eval.ppl and not p.eval.tasks:
        raise GhostedError("search needs an evaluation for the gate: the eval: section has no ppl and no tasks")
    if p.search.heal:  # the recipe's text is checked before anything loads, as `ghosted heal` does
        from ghosted.checks import check_device
        from ghosted.healing.data import refuse_evaluation_names

        refuse_evaluation_names(p.heal)
        check_device(p.heal.device, "--device (heal.device)")
    loaded, calib = _prepare(model, p, out, force, calibration, log, load)
    outcome = run_search(loaded, calib, template, p.search, p.eval, p.gate, progress=progress, log=log, heal=p.heal)
    outcome.doc["wall_seconds"] = time.perf_counter() - t0
    write_search(loaded, calib, outcome, Path(out), force=force)
    return outcome.doc


def evaluate(model: str, settings: EvalSettings | None = None, *, efficiency: EfficiencySettings | None = None,
             baseline: str | None = None, dtype: str = "float32", device: str = "cpu", device_map: str | None = None,
             progress: bool = True, log: Log = _nolog) -> dict:
    """What `ghosted eval` does: perplexity and zero-shot accuracy of MODEL (settings: EvalSettings()), and with
    `efficiency` (or a dense `baseline` to compare with) size, latency, throughput and peak memory."""
    from ghosted.evaluation.run import evaluate_model

    settings = settings or EvalSettings()
    if baseline is not None and efficiency is None:
        efficiency = EfficiencySettings()
    if settings.ppl:  # fail before the (long) efficiency runs, not after
        from ghosted.checks import check_seq_len
        from ghosted.models import load_tokenizer

        check_seq_len(load_tokenizer(model)[1], settings.seq_len)
    return evaluate_model(model, settings, dtype=dtype, device=device, device_map=device_map, efficiency=efficiency,
                          baseline=baseline, progress=progress, log=log)


def compare(model: str, config: CompareConfig, out_dir: str | Path, *, params: Params | None = None,
            calibration: str | Path | None = None, merge: str | Path | None = None,
            record: Mapping[str, Any] | None = None, progress: bool = True, log: Log = _nolog,
            **load: Any) -> dict:
    """What `ghosted compare` does: every (layers removed, recovery) cell of `config` against the dense model from
    one calibration pass (params.calibration, or the `calibration` folder); writes compare.json, compare.md and
    plots to `out_dir`. `merge`: an earlier compare.json whose cells are kept; `record`: extra keys to keep."""
    from ghosted.io import write_json_atomic
    from ghosted.reporting.compare_report import write_report
    from ghosted.solve.compare import run_compare

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise GhostedError(f"--out-dir {out_dir} exists and is not a folder")
    loaded = open_model(model, log=log, **load)
    calib = calibration_for(loaded, _as_params(params).calibration, calibration)
    partial = out_dir / "compare.partial.json"
    result = run_compare(loaded, calib, config, progress=progress, log=log, partial_path=partial,
                         merge=None if merge is None else Path(merge))
    result.update(record or {})
    result["wall_seconds"] = time.perf_counter() - t0
    try:
        paths = write_report(result, out_dir)
    except Exception:  # never lose a long run to a plotting problem: keep the numbers, then fail
        write_json_atomic(out_dir / "compare.json", result)
        raise
    partial.unlink(missing_ok=True)
    log(f"wrote {', '.join(str(p) for p in paths)} in {result['wall_seconds']:.0f}s")
    return result


@dataclass(frozen=True)
class HealResult:
    """What `heal` wrote: the checkpoint folder, whether it is healed (else the input unchanged, and why), the
    held-out loss before and after (None when no training ran), and the whole `heal` record of its lineage."""

    out: Path
    healed: bool
    heldout_nll_before: float | None
    heldout_nll_after: float | None
    steps: int
    reason: str | None = None
    record: dict[str, Any] = field(default_factory=dict, compare=False)


def heal(checkpoint: str | Path, params: Params | HealConfig | str | Path | None = None, out: str | Path | None = None,
         *, base: str | None = None, force: bool = False, if_enabled: bool = False, progress: bool = True,
         log: Log = _nolog) -> HealResult:
    """What `ghosted heal` does: distil the pruned `checkpoint` from its dense base (its lineage's base_model, or
    `base`) with the params' `heal:` recipe on training text, and write a checkpoint of the same kind to `out`
    (the input unchanged, with the reason, when healing does not lower the held-out loss). `if_enabled` (the
    pipeline's stage): when the recipe says enabled: false, write the input unchanged instead of healing."""
    from ghosted.healing.run import heal_checkpoint, write_unhealed

    cfg = params if isinstance(params, HealConfig) else _as_params(params).heal
    if out is None:
        raise GhostedError("out: give the output folder")
    if if_enabled and not cfg.enabled:
        rec = write_unhealed(checkpoint, out, "heal.enabled is false: not healed", base=base, force=force)
    else:
        rec = heal_checkpoint(checkpoint, cfg, out, base=base, force=force, progress=progress, log=log)
    return HealResult(out=Path(out), healed=rec["healed"], heldout_nll_before=rec["heldout_nll_before"],
                      heldout_nll_after=rec["heldout_nll_after"], steps=rec["steps_run"], reason=rec.get("reason"),
                      record=rec)


__all__ = ["HealResult", "PruneResult", "calibration_for", "compare", "evaluate", "heal", "load_params", "open_model",
           "prune", "prune_template", "refuse_ghost_model", "search"]
