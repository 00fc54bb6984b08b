"""Save a pruned model as a Hugging Face folder; verify it; load it back with or without ghosts.

- No residual ghost (none, scalar, replaceme on foldable families): a standard checkpoint of the
  base architecture with fewer layers; `AutoModelForCausalLM.from_pretrained(dir)` loads it.
- With ghosts: its own model type. config.json says `model_type: ghosted`,
  `architectures: [GhostedForCausalLM]` and maps AutoConfig / AutoModelForCausalLM to
  `configuration_ghosted.py` / `modeling_ghosted.py` in the folder; the weights (ghosts.<site>.*
  included) are `model.ghosted.safetensors`. So `from_pretrained(dir, trust_remote_code=True)` runs
  the ghosts, `ghosted.load(dir)` runs them with this package's code, and every loader that does
  not run the code refuses the folder (AutoModel: unknown model type; the base class: no
  model.safetensors) instead of silently dropping the ghosts.
Both carry a `ghosted` block in config.json with the lineage (checkpoint.meta.CheckpointMeta), and
`ghosted_manifest.json` with the sha256 of every file; checkpoint.verify checks it and the tensors before
anything is loaded, checkpoint.upgrade rewrites a checkpoint of an older format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from ghosted._remote import modeling_ghosted
from ghosted.checkpoint.card import CARD, is_inert, model_card
from ghosted.checkpoint.meta import CheckpointMeta, read_config
from ghosted.errors import GhostedError
from ghosted.hashing import cached_sha256
from ghosted.io import atomic_dir, carry
from ghosted.io_temps import MANIFEST, MARKER
from ghosted.json_io import read_json
from ghosted.method import arch

FORMAT = 2  # 1: older ghosted (model_type of the base, weights in model.safetensors, no manifest)
MODEL_TYPE = "ghosted"
MODEL_CLASS = "GhostedForCausalLM"
CONFIG_CLASS = "GhostedConfig"
MODELING_FILE = "modeling_ghosted.py"
CONFIG_FILE = "configuration_ghosted.py"
VARIANT = modeling_ghosted.WEIGHTS_VARIANT
AUTO_MAP = {"AutoConfig": f"{CONFIG_FILE[:-3]}.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MODEL_CLASS}"}
_GHOST_TENSOR = re.compile(r"^ghosts\.(\d+)\.(weight|U|V|bias|sink_shift|norm_weight|shift_weight|detect_weight|detect_bias|detect_shift)$")


def _base_classes(base: str) -> tuple[type, type]:
    """The transformers *ForCausalLM class named `base` and its config class."""
    import transformers

    model_cls = getattr(transformers, str(base), None) if base else None
    if model_cls is None or not hasattr(model_cls, "config_class"):
        raise GhostedError(f"unknown base architecture {base!r}: this transformers ({transformers.__version__}) "
                           "has no such model class")
    return model_cls, model_cls.config_class


def remote_sources(base: str) -> dict[str, str]:
    """The code files of a ghost checkpoint over `base`, exactly as this version writes them."""
    model_cls, config_cls = _base_classes(base)
    modeling = resources.files("ghosted._remote").joinpath(MODELING_FILE).read_text(encoding="utf-8")
    modeling += (
        f"\n\nfrom transformers import {model_cls.__name__} as _Base  # noqa: E402\n\n"
        f"from .{CONFIG_FILE[:-3]} import {CONFIG_CLASS}  # noqa: E402\n\n\n"
        f"class {MODEL_CLASS}(GhostedMixin, _Base):\n"
        f"    \"\"\"{model_cls.__name__} with ghost operators at the pruned boundaries.\"\"\"\n\n"
        f"    config_class = {CONFIG_CLASS}\n"
    )
    configuration = (
        "# Config of a ghosted checkpoint: the base architecture's config under its own model type, so that a\n"
        "# loader that does not run this folder's code refuses it instead of loading the base model without\n"
        "# its ghosts. Written by ghosted; `ghosted verify DIR` checks it.\n"
        f"from transformers import {config_cls.__name__} as _BaseConfig\n\n\n"
        f"class {CONFIG_CLASS}(_BaseConfig):\n"
        f"    \"\"\"{config_cls.__name__} of a layer-pruned model with ghost operators.\"\"\"\n\n"
        f"    model_type = \"{MODEL_TYPE}\"\n"
    )
    return {MODELING_FILE: modeling, CONFIG_FILE: configuration}


@cache
def ghost_classes(base: str) -> tuple[type, type]:
    """(GhostedConfig, GhostedForCausalLM) over `base`, from this package's code (never the folder's)."""
    model_cls, config_cls = _base_classes(base)
    cfg = type(CONFIG_CLASS, (config_cls,), {"model_type": MODEL_TYPE, "__module__": __name__})
    model = type(MODEL_CLASS, (modeling_ghosted.GhostedMixin, model_cls),
                 {"config_class": cfg, "__module__": __name__})
    return cfg, model


def _listed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, MARKER))


def write_manifest(folder: Path, kept: Collection[str] = ()) -> dict:
    """ghosted_manifest.json: the sha256 of every file in the folder (but itself and the output marker); `kept`:
    those that are the user's (carried over by `ghosted upgrade`), which it lists but never counts as ghosted's."""
    from ghosted.version import __version__

    doc = {"ghosted": __version__, "format": FORMAT, "algorithm": "sha256",
           "files": {name: cached_sha256(folder / name) for name in _listed_files(folder)}}
    if kept:
        doc["kept"] = sorted(kept)
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def _check_finite(model: torch.nn.Module, chunk: int = 1 << 20) -> None:
    # chunk by chunk: torch.isfinite of a whole tensor makes an |x| copy and a mask of it (the embedding of
    # SmolLM2: 113 + 28 MiB, the save's peak before)
    for name, t in model.state_dict().items():
        flat = t.reshape(-1) if t.is_floating_point() else t.new_empty(0)
        if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
            raise GhostedError(f"not saving: tensor {name} has non-finite values (nan/inf); the fit or the model "
                               "is broken, try a larger --ridge or float32")


def param_counts(folder: Path) -> dict[str, int | None]:
    """{"params": every tensor stored in the folder's weights (ghosts included), "params_dense": the dense base's}.

    The dense count is the stored non-layer tensors (a head the fold untied from the embedding counted once, as
    the tied base stores it) plus the kept layers' mean size times the dense layer count: exact for families
    whose layers are all the same size (every supported one); None where the folder says no dense layer count."""
    from safetensors import safe_open

    doc = read_json(folder / "config.json", "model config", expect=dict)
    block = doc.get("ghosted") if isinstance(doc.get("ghosted"), dict) else {}
    layers_path = re.escape(str(block.get("layers_path") or "model.layers").removeprefix("model."))
    layer_re = re.compile(rf"^(?:model\.)?{layers_path}\.(\d+)\.")
    sizes: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                sizes[key] = int(torch.Size(shape).numel())
    total = sum(sizes.values())
    if not block:
        return {"params": total, "params_dense": total}
    dense_layers = block.get("num_layers_dense")
    per_layer: dict[int, int] = {}
    rest = 0
    for key, n in sizes.items():
        m = layer_re.match(key)
        if m:
            per_layer[int(m[1])] = per_layer.get(int(m[1]), 0) + n
        elif not key.startswith("ghosts."):
            rest += n
    if not isinstance(dense_layers, int) or not per_layer:
        return {"params": total, "params_dense": None}
    if "lm_head.weight" in sizes and any("head untied" in str(x) for x in block.get("folded") or []):
        rest -= sizes["lm_head.weight"]
    layer_mean = sum(per_layer.values()) / len(per_layer)
    return {"params": total, "params_dense": rest + round(layer_mean * dense_layers)}


def save(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: CheckpointMeta, force: bool = False,
         keep: dict[str, Path] | None = None, rewrite: Collection[str] | None = None) -> Path:
    """Write the checkpoint atomically (see io.atomic_dir): never half-written, a user's folder never replaced.

    Every checkpoint gets a model card (README.md). `rewrite` (`ghosted upgrade`): rewrite the checkpoint in
    `out_dir` in place, where `rewrite` names its files whose content this save writes anew in another form (the
    weights it loaded); `keep`: {name: entry of out_dir} that are the user's, carried over unchanged. A kept file
    no loader reads replaces what this would write under its name (the user's README.md); a file this writes
    under the name of any other kept file is this save's (config, tokenizer: the checkpoint's content anew)."""
    out = Path(out_dir)
    cfg = model.config
    has_ghosts = meta.has_ghosts
    base = meta.base_architecture
    if has_ghosts:
        remote = remote_sources(base)  # an unknown base fails here, before anything is written
    _check_finite(model)
    block = {**meta.to_dict(), "format": FORMAT}
    if "layers_path" not in block:
        spec = arch.get_arch(model)
        block["layers_path"], block["final_norm_path"] = spec.layers, spec.final_norm
    saved = {k: getattr(cfg, k) for k in ("ghosted", "auto_map") if hasattr(cfg, k)}
    keep = keep or {}
    written: set[str] = set()  # what this save wrote itself (the user's versions of inert files left out)

    def rewrites(tmp: Path, name: str) -> bool:
        return name in (rewrite or ()) or name in written

    with atomic_dir(out, force=force, kind="checkpoint", rewrites=None if rewrite is None else rewrites) as tmp:
        try:
            cfg.ghosted = block
            if hasattr(cfg, "auto_map"):
                del cfg.auto_map
            model.save_pretrained(tmp, variant=VARIANT if has_ghosts else None)
        finally:
            for k in ("ghosted", "auto_map"):
                if k in saved:
                    setattr(cfg, k, saved[k])
                elif hasattr(cfg, k):
                    delattr(cfg, k)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if has_ghosts:
            for name, text in remote.items():
                (tmp / name).write_text(text, encoding="utf-8")
            # save_pretrained writes the in-memory class's name and type; the folder must name its own.
            doc.update(model_type=MODEL_TYPE, architectures=[MODEL_CLASS], auto_map=dict(AUTO_MAP))
        else:
            doc["architectures"] = [base]
            doc.pop("auto_map", None)
        (tmp / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(model_card(CheckpointMeta.from_dict(block), out.name, param_counts(tmp)),
                                encoding="utf-8")
        written.update(_listed_files(tmp))
        kept = []
        for name, src in sorted(keep.items()):
            if name in written:
                if not is_inert(name) or not (src.is_file() or src.is_symlink()):
                    continue  # the checkpoint's own file, written anew
                (tmp / name).unlink()
                written.discard(name)
            carry(src, tmp / name)
            kept.append(name)
        write_manifest(tmp, kept=[n for n in kept if n in _listed_files(tmp)])
    return out


def base_config(doc: dict, base: str):
    _, config_cls = _base_classes(base)
    skip = ("model_type", "auto_map", "architectures", "transformers_version")
    body = {k: v for k, v in doc.items() if k not in skip}
    try:
        return config_cls.from_dict(body)
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects is a broken checkpoint
        why = " ".join(str(exc).split())
        raise GhostedError(f"config.json does not make a valid {config_cls.__name__}: {why}") from exc


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, resolved with the base config (AutoTokenizer alone asks to run the code)."""
    from transformers import AutoTokenizer

    doc = read_config(Path(path))
    base = CheckpointMeta.from_dict(doc["ghosted"]).base_architecture or None
    # the tokenizer of a ghost checkpoint is its base model's: never the folder's code, so never transformers'
    # "run the custom code? [y/N]" prompt (it stalls a terminal, e.g. under `mlflow models serve`)
    return AutoTokenizer.from_pretrained(str(path), config=base_config(doc, base), trust_remote_code=False)
