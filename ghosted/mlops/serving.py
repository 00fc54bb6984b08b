"""A ghosted checkpoint as an MLflow pyfunc model: prompts in, generated text out.

`save_pyfunc` writes an MLflow model folder (MLmodel, signature, input example, requirements) that holds the
checkpoint as the artifact `checkpoint` and a three-line models-from-code entry point that imports the INSTALLED
ghosted (pinned in the requirements): no copy of ghosted's code travels in the artifact store, so nothing stored
there runs as ghosted (no pickle either: MLflow refuses to unpickle models by default, and a pickle runs code on
load). `mlflow.pyfunc.load_model` and `mlflow models serve` then run `GhostedTextGenerator`, whose `load_context`
checks the checkpoint's content against the sha256 recorded at registration (the model's config, and the registry's
version tag where the registry is reachable), verifies it, and loads it with `ghosted.load`.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from ghosted.errors import GhostedError
from ghosted.io import temp_dir

ARTIFACT = "checkpoint"
SHA_KEY = "checkpoint_sha256"  # in the model's config: the checkpoint's content hash when it was registered
RUN_KEY = "run_id"  # in the model's config: the run that logged it (its registry version's run)
INPUT_COLUMN = "prompt"
# Generation parameters a caller may pass (`params` of predict, `"params"` of a /invocations request).
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
EXAMPLE_PROMPT = "The capital of France is"
# The file MLflow executes to build the model (models from code); it must not reference this module's path.
ENTRY_POINT = (
    "from mlflow.models import set_model\n\n"
    "from ghosted.mlops.serving import GhostedTextGenerator\n\n"
    "set_model(GhostedTextGenerator())\n"
)


def _python_model_base():
    try:
        import mlflow.pyfunc
    except ImportError as exc:
        raise GhostedError("registering needs MLflow: pip install -e '.[pipeline]'") from exc
    return mlflow.pyfunc.PythonModel


def prompts_of(model_input: Any) -> list[str]:
    """The prompts of a predict input: a DataFrame (column `prompt`, or its only column), a list or a string."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = INPUT_COLUMN if INPUT_COLUMN in model_input.columns else (
            model_input.columns[0] if len(model_input.columns) == 1 else None)
        if col is None:
            raise GhostedError(f"expected a `{INPUT_COLUMN}` column, got columns {list(model_input.columns)}")
        values = model_input[col].tolist()
    elif isinstance(model_input, pd.Series | np.ndarray):
        values = list(model_input.reshape(-1) if isinstance(model_input, np.ndarray) else model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, Mapping) and INPUT_COLUMN in model_input:
        v = model_input[INPUT_COLUMN]
        values = [v] if isinstance(v, str) else list(v)
    elif isinstance(model_input, Sequence):
        values = list(model_input)
    else:
        raise GhostedError(f"expected prompts (strings), got {type(model_input).__name__}")
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise GhostedError(f"every prompt must be a string, got {bad[0]!r}")
    return values


# MLflow warns on every PythonModel subclass whose predict has no type hints; the signature here is explicit.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method", category=UserWarning)


class GhostedTextGenerator(_python_model_base()):
    """Greedy (or sampled) continuation of each prompt by a ghosted checkpoint; returns only the new text."""

    def load_context(self, context) -> None:
        import torch

        import ghosted
        from ghosted.checkpoint.format import load_tokenizer

        path = context.artifacts[ARTIFACT]
        check_artifact(path, context.model_config or {})
        self.model = ghosted.load(path)  # verified by check_artifact: the unchanged folder is not read twice
        # the base model's tokenizer, resolved without the folder's code: AutoTokenizer alone reads the ghost
        # config, asks "run the custom code? [y/N]" and stalls a terminal (and `mlflow models serve`)
        self.tokenizer = load_tokenizer(path)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._no_grad = torch.inference_mode

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        texts = prompts_of(model_input)
        if not texts:
            return []
        p = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        n = int(p["max_new_tokens"])
        if n < 1:
            raise GhostedError(f"max_new_tokens must be >= 1, got {n}")
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        sampling = {"do_sample": True, "temperature": float(p["temperature"]), "top_p": float(p["top_p"])} \
            if p["do_sample"] else {"do_sample": False}
        with self._no_grad():
            out = self.model.generate(**enc, max_new_tokens=n, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = out[:, enc["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def signature():
    """Input: one unnamed string column (a DataFrame column or a list of prompts); output: one string per
    prompt; params: the generation settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {bool: "boolean", int: "long", float: "double"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in GENERATION_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                          params=params)


# --------------------------------------------------------------------------- requirements


def _declared_requirements() -> list[str]:
    """The project's core dependencies: pyproject.toml of this source tree, else the installed metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project") or {}
        if project.get("name") == "ghosted":
            return list(project.get("dependencies") or [])
    try:
        reqs = metadata.requires("ghosted") or []
    except metadata.PackageNotFoundError as exc:
        raise GhostedError("cannot find ghosted's dependencies (no pyproject.toml beside the package and no "
                           "installed distribution): pip install -e .") from exc
    return [r for r in reqs if "extra ==" not in r]


def pip_requirements() -> list[str]:
    """ghosted itself (the model runs the installed package, not a stored copy of its code) and the project's own
    dependencies, each pinned to the version installed here (local labels such as +cpu dropped, so pip can find
    it); a dependency that is not installed keeps its declared specifier."""
    from packaging.requirements import Requirement

    from ghosted.version import __version__

    out = [f"ghosted=={__version__}"]
    for line in _declared_requirements():
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        try:
            version = metadata.version(req.name).split("+")[0]
        except metadata.PackageNotFoundError:
            out.append(f"{req.name}{extras}{req.specifier}")
            continue
        out.append(f"{req.name}{extras}=={version}")
    return out


# --------------------------------------------------------------------------- saving


def save_pyfunc(checkpoint: Path, path: Path, metadata_: Mapping[str, str] | None = None,
                config: Mapping[str, str] | None = None) -> Path:
    """Write the MLflow pyfunc model of `checkpoint` to the new folder `path`; `config` (the model's config:
    SHA_KEY, RUN_KEY) is what `load_context` checks the checkpoint against."""
    import mlflow.pyfunc
    import pandas as pd

    with temp_dir(tempfile.gettempdir(), "ghosted-pyfunc") as tmp:  # marked: a killed run's is swept
        entry = Path(tmp) / "ghosted_model.py"
        entry.write_text(ENTRY_POINT, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow warns about optional features we do not use
            mlflow.pyfunc.save_model(
                path=str(path), python_model=str(entry), artifacts={ARTIFACT: str(Path(checkpoint).resolve())},
                signature=signature(), input_example=pd.DataFrame({INPUT_COLUMN: [EXAMPLE_PROMPT]}),
                pip_requirements=pip_requirements(), metadata=dict(metadata_ or {}), model_config=dict(config or {}))
    return Path(path)


def checkpoint_path(mlmodel: Path) -> str:
    """Where an MLflow model folder holds the checkpoint (artifacts/<name>), as its MLmodel file records it."""
    import yaml

    try:
        doc = yaml.safe_load(Path(mlmodel).read_text(encoding="utf-8")[:1 << 20])
        rel = doc["flavors"]["python_function"]["artifacts"][ARTIFACT]["path"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError) as exc:
        raise GhostedError(f"{mlmodel}: records no `{ARTIFACT}` artifact: not a ghosted MLflow model") from exc
    parts = PurePosixPath(str(rel)).parts
    if not isinstance(rel, str) or not parts or parts[0] == "/" or ".." in parts:
        raise GhostedError(f"{mlmodel}: its `{ARTIFACT}` artifact path {rel!r} is not inside the model folder")
    return rel


# --------------------------------------------------------------------------- loading


def _registered_hashes(run_id: str) -> list[str]:
    """The checkpoint_sha256 tags of the registry versions of run `run_id`, in the registry MLflow is pointed at
    (none where there is no registry: a model folder copied elsewhere, a registry out of reach)."""
    import mlflow

    from ghosted.config import RegistryConfig
    from ghosted.mlops.registry.connection import connect
    from ghosted.mlops.registry.names import SHA_TAG

    try:
        client = connect(RegistryConfig(mlflow.get_registry_uri()), create=False, db_timeout=5.0)
        versions = client.search_model_versions(f"run_id='{run_id}'")
    except Exception:  # noqa: BLE001 - no registry to ask: the hash in the model's config is the check
        return []
    return [str(v.tags.get(SHA_TAG)) for v in versions]


def check_artifact(path: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse a model whose checkpoint is not the one registered: its content sha256 against the one recorded at
    registration (the model's config; the registry's version tags where reachable), then checkpoint.verify."""
    from ghosted.checkpoint.verify import verified

    want = config.get(SHA_KEY)
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
        raise GhostedError(f"this MLflow model records no {SHA_KEY} of its checkpoint (registered by an older "
                           "ghosted, or edited): register the checkpoint again with `ghosted register`")
    got = verified(path).sha256
    run_id = config.get(RUN_KEY)
    recorded = _registered_hashes(run_id) if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id) \
        else []
    for expected, where in ((want, "the model's config"), *((h, "the registry") for h in recorded)):
        if got != expected:
            raise GhostedError(f"{path}: the checkpoint's content (sha256 {got[:12]}) is not the one registered "
                               f"(sha256 {expected[:12]}, recorded in {where}): the artifact store was changed after "
                               "registration; register the checkpoint again")

