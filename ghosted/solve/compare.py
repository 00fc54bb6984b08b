"""`ghosted compare`: a grid of pruned variants against the dense model.

A grid costs ONE calibration pass: a shared capture holds the sums of every candidate block for every k,
and each (k, method) cell is solved from it and evaluated in memory by grid.run_cell. The results so far
are kept in a partial file after every cell, so an interrupted grid resumes where it stopped. One model's
evaluation (`ghosted eval`) lives in evaluate/run.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ghosted.config import (  # noqa: F401  (re-exported: the grid's settings live in ghosted.config)
    PPL_SOURCES_HELP,
    CompareConfig,
    EfficiencySettings,
    EvalSettings,
    parse_ks,
    parse_names,
    to_json,
)
from ghosted.errors import GhostedError
from ghosted.json_io import read_json
from ghosted.method import arch
from ghosted.solve.grid import CellResult, brief, grid_header, run_cell, run_dense
from ghosted.version import __version__

Log = Callable[[str], None]

def _nolog(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- settings


def model_identity(loaded) -> dict[str, str]:
    """The identity of the grid's model by content (a checkpoint's verified sha256, a dense model's fingerprint),
    recorded in compare.json: what --merge and a resumed grid compare, never the model's name or path."""
    from ghosted.evaluation.provenance import model_identity as identity

    return {k: v for k, v in identity(loaded.ref).items() if k != "name"}


def _resume_key(loaded, calib, cfg: CompareConfig, identity: dict[str, str]) -> str:
    import hashlib

    doc = {"model": loaded.ref.name, "path": loaded.ref.path, "identity": identity, "calibration": calib.sha256,
           "ghosted": __version__,
           "dtype": str(next(loaded.model.parameters()).dtype), "prune": to_json(cfg.prune),
           "eval": to_json(cfg.evaluation)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _load_partial(path: Path | None, key: str, log: Log) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        doc = read_json(path, "partial compare result", expect=dict)
    except (OSError, ValueError):  # unreadable or malformed: start afresh (JSONFileError is a ValueError)
        return {}
    if doc.get("key") != key:
        log(f"{path} belongs to other settings: starting afresh")
        return {}
    return doc


def merge_source(path: Path, loaded, calib, cfg: CompareConfig, identity: dict[str, str]) -> dict:
    """An earlier compare.json whose dense model and cells a new grid may reuse: the same model by content
    (`identity`, see model_identity), dtype, calibration windows (sha256), evaluation settings and shared prune
    settings, or a GhostedError that names the difference."""
    doc = read_json(path, "compare.json for --merge", fix="give a compare.json written by `ghosted compare`")
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), list) or not isinstance(doc.get("dense"), dict):
        raise GhostedError(f"--merge {path}: not a compare result (no dense model and list of cells)")
    old_prune = (doc.get("settings") or {}).get("prune") or {}
    new_prune = {k: v for k, v in to_json(cfg.prune).items() if k not in ("remove", "layers", "recovery")}
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    old_identity = doc.get("model_identity")
    if old_identity != identity:
        what = ("records no content hash of its model (written by an older ghosted)" if not old_identity else
                f"was run on another model ({_identity_text(old_identity)}; this grid's {doc.get('model')} is "
                f"{_identity_text(identity)}: same name or not, other bytes)")
        raise GhostedError(f"--merge {path}: {what}; its cells are not comparable: run the whole grid instead")
    checks = {"dtype": (doc.get("dtype"), dtype),
              "calibration": ((doc.get("calibration") or {}).get("sha256"), calib.sha256),
              "evaluation settings": ((doc.get("settings") or {}).get("eval"), to_json(cfg.evaluation)),
              **{f"prune.{k}": (old_prune[k], new_prune[k]) for k in sorted(set(old_prune) & set(new_prune))}}
    for what, (old, new) in checks.items():
        if old != new:
            raise GhostedError(f"--merge {path}: its {what} ({old}) differs from this grid's ({new}); "
                               "its cells are not comparable: run the whole grid instead")
    return doc


def _identity_text(identity: object) -> str:
    if not isinstance(identity, dict):
        return repr(identity)[:80]
    value = identity.get("checkpoint_sha256") or identity.get("fingerprint")
    return f"{'checkpoint sha256' if 'checkpoint_sha256' in identity else 'fingerprint'} {str(value)[:24]}"


def run_compare(loaded, calib, cfg: CompareConfig, progress: bool = True, log: Log = _nolog,
                partial_path: Path | None = None, merge: Path | None = None) -> dict:
    """Dense model once, then every (k, method) cell solved from one shared capture and evaluated in memory.

    partial_path: after the dense model and after every cell the results so far are written there
    (atomically); a later run with the same model, calibration and settings skips what it holds, so an
    interrupted grid resumes where it stopped.

    merge: an earlier compare.json (see merge_source) whose dense model and cells are kept as they are; only
    the cells it lacks are run, and the result lists both (each old cell keeps the versions it ran with)."""
    from ghosted.evaluation.run import versions
    from ghosted.io import write_json_atomic
    from ghosted.method.selection import check_k
    from ghosted.solve.solver import shared_capture

    t0 = time.perf_counter()
    L = arch.num_layers(loaded.model)
    for k in cfg.ks:
        check_k(k, L)
    identity = model_identity(loaded)
    merged = merge_source(merge, loaded, calib, cfg, identity) if merge is not None else None  # before the capture
    res = shared_capture(loaded, calib, cfg.prune, list(cfg.ks), list(cfg.methods), progress, log)
    header = grid_header(loaded, calib, cfg.prune, list(cfg.ks), list(cfg.methods), cfg.evaluation, res,
                         time.perf_counter() - t0)

    key = _resume_key(loaded, calib, cfg, identity)
    done = _load_partial(partial_path, key, log)
    done_cells = {(c["k"], c["method"]): c for c in done.get("cells", []) if not c.get("error")}
    methods = list(cfg.methods)
    if merged is not None:
        old = {(c["k"], c["method"]): c for c in merged["cells"] if not c.get("error")}
        done_cells = {**old, **done_cells}
        done = {**done, "dense": done.get("dense") or {"k": 0, "method": "dense", **merged["dense"]}}
        methods = [m for m in (merged.get("settings") or {}).get("recovery", []) if m not in methods] + methods
        log(f"merging {merge}: dense model and {len(old)} cell(s) kept; new cells: "
            f"{sum(1 for c in cfg.cells() if c not in done_cells)}")

    def save_partial() -> None:
        if partial_path is not None:
            write_json_atomic(partial_path, {"key": key, "dense": dense, "cells": cells})

    if (done.get("dense") or {}).get("method") == "dense":
        dense = done["dense"]
        log(f"resuming from {merge if merged is not None else partial_path}: dense model and {len(done_cells)} "
            "cell(s) already evaluated")
    else:
        log("evaluating the dense model")
        dense = run_dense(loaded.model, loaded.tokenizer, cfg.evaluation, progress).as_dict()
    log(f"dense: {brief(CellResult.from_dict(dense))}")
    cells: list[dict] = []
    save_partial()

    ks = sorted(set(cfg.ks) | ({c[0] for c in done_cells} if merged is not None else set()))
    for k, method in [(k, m) for k in ks for m in methods]:
        if (k, method) not in done_cells and (k not in cfg.ks or method not in cfg.methods):
            continue  # a merged grid's k or method this run does not cover
        if (k, method) in done_cells:
            cells.append(done_cells[(k, method)])
            continue
        cell = run_cell(loaded, calib, res, cfg.cell_config(k, method), cfg.evaluation,
                        dense_average=dense.get("average"), progress=progress, log=log)
        cells.append(cell.as_dict())
        if cell.error is None:
            save_partial()
            log(f"k={k} {method} (layers {cell.removed_text}): {brief(cell)}")

    extra = {}
    if merged is not None:
        header["settings"] = {**header["settings"], "remove": ks, "recovery": methods}
        extra = {"merged": {"from": str(merge), "command": merged.get("command"), "versions": merged.get("versions"),
                            "cells": [[k, m] for k, m in old if (k, m) in {(c["k"], c["method"]) for c in cells}]}}
    return {**header, "model_identity": identity, "kind": "compare", "dense": dense, "cells": cells,
            "versions": versions(), "seconds": time.perf_counter() - t0, **extra}
