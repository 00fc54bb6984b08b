"""`ghosted heal`: distil a pruned checkpoint from its dense base and write a checkpoint of the same kind.

1. The checkpoint is verified and its lineage read: the dense base (config.json `ghosted.base_model`, or `base`)
   must have the recorded `base_fingerprint` (ghosted.models.identity) before it is loaded.
2. The healing windows (ghosted.healing.data) are built and checked against the evaluation texts: nothing loads
   while they might still be refused.
3. The teacher (the dense base) gives its top-k next-token log-probs on the training windows once
   (ghosted.solve.distill.teacher_topk), and is freed before the student loads.
4. The student trains (ghosted.healing.train); its held-out next-token loss after the adapters are merged is compared
   with the loaded checkpoint's: only a lower one is kept.
5. The checkpoint is written by the one writer (ghosted.checkpoint.format.save): the same kind as the input, its
   lineage with `healed` and a `heal` record (recipe, plan, data, tokens, wall time, curve; the reason when the
   guard kept the checkpoint unhealed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ghosted.checkpoint.meta import CheckpointMeta
from ghosted.config import to_json
from ghosted.config.heal import HealConfig
from ghosted.errors import GhostedError
from ghosted.healing.data import HealData, heal_data
from ghosted.healing.train import Trained, autocast_for, check_plan, heal_model, plan_heal

SAVE_SECONDS = 30.0  # kept back from the time budget for the final checks and the write


@dataclass(frozen=True)
class Source:
    """The checkpoint to heal and its verified dense base."""

    path: Path
    meta: CheckpointMeta
    sha256: str
    base: str


def open_source(checkpoint: str | Path, base: str | None = None) -> Source:
    """Verify the checkpoint and find its dense base by the lineage; one line when either is wrong."""
    from ghosted.checkpoint.meta import read_meta
    from ghosted.checkpoint.verify import verified
    from ghosted.models import identity

    path = Path(checkpoint)
    sha = verified(path).sha256
    meta = read_meta(path)
    if not meta.removed_layers:
        raise GhostedError(f"{path} records no removed layers: heal a checkpoint written by `ghosted prune`")
    if not meta.base_fingerprint:
        raise GhostedError(f"{path} records no base_fingerprint, so its dense base cannot be checked: prune the base "
                           "again with this ghosted")
    ref = base or meta.base_model
    if not ref:
        raise GhostedError(f"{path} does not name its dense base model: pass --base MODEL")
    try:
        found = identity(str(ref))
    except GhostedError as exc:
        raise GhostedError(f"the dense base {ref!r} of {path} cannot be read ({exc}); pass --base MODEL") from None
    if found != meta.base_fingerprint:
        raise GhostedError(f"the dense base {ref!r} is {found[:19]}, but {path} was pruned from "
                           f"{meta.base_fingerprint[:19]}: pass --base with the model it was pruned from")
    return Source(path, meta, sha, str(ref))


def _teacher(src: Source, data: HealData, cfg: HealConfig, progress: bool, log: Callable[[str], None]):
    """The dense base's top-k log-probs on the training windows, and its seconds per window."""
    from ghosted.checks import check_seq_len
    from ghosted.memory import release_memory
    from ghosted.models import load_model
    from ghosted.solve.distill import teacher_topk

    loaded = load_model(src.base, device=cfg.device)
    check_seq_len(loaded.model.config, cfg.seq_len)
    t0 = time.perf_counter()
    with autocast_for(torch.device(cfg.device))():
        topk = teacher_topk(loaded.model, data.calib.input_ids[data.fit], cfg.top_k, cfg.batch_size, progress)
    per_window = (time.perf_counter() - t0) / len(data.fit)
    log(f"teacher: top-{cfg.top_k} log-probs of {len(data.fit)} windows in {time.perf_counter() - t0:.0f}s")
    del loaded
    release_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return topk, per_window


def _heldout(model: torch.nn.Module, data: HealData, cfg: HealConfig) -> float:
    from ghosted.evaluation.perplexity import mean_nll

    with autocast_for(next(model.parameters()).device)():
        return mean_nll(model, data.calib.input_ids[data.heldout], cfg.batch_size)


def _record(cfg: HealConfig, src: Source, data: HealData, plan, trained: Trained, after: float,
            seconds: dict[str, float]) -> dict:
    run = trained.run
    T = data.calib.seq_len
    return {"recipe": to_json(cfg), "plan": plan.to_dict(), "trained_params": trained.params,
            "teacher": {"base_model": src.meta.base_model, "base_fingerprint": src.meta.base_fingerprint},
            "from_checkpoint_sha256": src.sha256, "data": data.record(),
            "tokens": {"teacher": len(data.fit) * T, "train": run.steps * cfg.batch_size * T,
                       "heldout": len(data.heldout) * T},
            "steps_run": run.steps, "stopped": run.stopped, "heldout_nll_before": run.before,
            "heldout_nll_after": after, "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "curve": run.curve}


def _student(src: Source, cfg: HealConfig):
    """The checkpoint as loaded (on the CPU until the teacher is done) and its HealPlan, checked against it."""
    from ghosted.checkpoint.load import load
    from ghosted.checks import check_seq_len

    model = load(src.path)
    check_seq_len(model.config, cfg.seq_len, "--seq-len (heal.seq_len)")
    plan = plan_heal(model, list(src.meta.removed_layers), cfg)
    check_plan(model, plan)
    return model, plan


def _judge(model, src: Source, data: HealData, trained: Trained, cfg: HealConfig):
    """(model to write, held-out loss after, the reason it is unhealed or None): the guard's verdict."""
    from ghosted.checkpoint.load import load

    before = trained.run.before
    if trained.kept == "unhealed":
        return model, before, f"no held-out evaluation beat the checkpoint's loss {before:.4f}"
    after = _heldout(model, data, cfg)
    if not after < before:  # the merged weights round differently from the hooked adapters
        return load(src.path), before, f"held-out loss {after:.4f} after merging is not below {before:.4f}"
    return model, after, None


def write_unhealed(checkpoint: str | Path, out: str | Path, reason: str, *,
                   base: str | None = None, force: bool = False) -> dict:
    """Write `checkpoint` unchanged to `out` with `healed: false` and `reason` (the pipeline's heal stage when
    heal.enabled is false); its lineage is checked as for healing. Returns the `heal` record written.

    The record holds no recipe: none was applied."""
    from ghosted.checkpoint import format as checkpoint_format
    from ghosted.checkpoint.load import load
    from ghosted.io_owned import check_out_dir
    from ghosted.version import __version__

    check_out_dir(out, force)
    src = open_source(checkpoint, base)
    record = {"from_checkpoint_sha256": src.sha256, "steps_run": 0,
              "heldout_nll_before": None, "heldout_nll_after": None, "reason": reason}
    if src.meta.heal:
        record["previous"] = src.meta.heal
    meta = CheckpointMeta.from_dict({**src.meta.to_dict(), "version": __version__,
                                     "healed": bool(src.meta.healed), "heal": record})
    checkpoint_format.save(load(src.path), checkpoint_format.load_tokenizer(src.path), out, meta, force=force)
    return {"healed": bool(src.meta.healed), **record}


def heal_checkpoint(checkpoint: str | Path, cfg: HealConfig, out: str | Path, *, base: str | None = None,
                    force: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Heal `checkpoint` with `cfg` into `out` (module docstring); returns the `heal` record written."""
    from ghosted.checkpoint import format as checkpoint_format
    from ghosted.checks import check_device
    from ghosted.io_owned import check_out_dir
    from ghosted.version import __version__

    t0 = time.perf_counter()
    check_device(cfg.device, "--device (heal.device)")
    check_out_dir(out, force)
    src = open_source(checkpoint, base)
    model, plan = _student(src, cfg)
    tokenizer = checkpoint_format.load_tokenizer(src.path)
    data = heal_data(tokenizer, cfg)
    log(f"healing windows: {data.calib.n} x {data.calib.seq_len} tokens from {data.calib.source} "
        f"({len(data.heldout)} held out; sha256 {data.calib.sha256[:12]}), none of them evaluation text")
    t_data = time.perf_counter()
    teacher, per_window = _teacher(src, data, cfg, progress, log)
    t_teacher = time.perf_counter()
    deadline = None
    if cfg.max_minutes is not None:  # room for the last step, the last held-out check and the write
        deadline = t0 + 60 * cfg.max_minutes - SAVE_SECONDS - per_window * (len(data.heldout) + 3 * cfg.batch_size)
    trained = heal_model(model.to(cfg.device), plan, data, teacher, cfg, progress, log, deadline)
    model, after, reason = _judge(model, src, data, trained, cfg)
    seconds = {"data": t_data - t0, "teacher": t_teacher - t_data, "train": time.perf_counter() - t_teacher}
    record = _record(cfg, src, data, plan, trained, after, seconds)
    if src.meta.heal:  # healed before: that record stays in the lineage
        record["previous"] = src.meta.heal
    if reason:
        record["reason"] = reason
        log(f"heal: {reason}; writing the checkpoint unhealed")
    else:
        log(f"heal: held-out loss {trained.run.before:.4f} -> {after:.4f} after {trained.run.steps} steps")
    record["seconds"]["total"] = round(time.perf_counter() - t0, 1)  # the write itself is not counted
    meta = CheckpointMeta.from_dict({**src.meta.to_dict(), "version": __version__, "healed": reason is None,
                                     "heal": record})
    checkpoint_format.save(model.to("cpu"), tokenizer, out, meta, force=force)
    return {"healed": reason is None, **record}
