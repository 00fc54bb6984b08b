"""Architecture adapters: where each model family keeps its layers, norms and projections.

Families are data (`ghosted/_data/architectures/<family>.json`), looked up by `config.architectures[0]` (or the
model's class) and then `config.model_type`; unknown families get a heuristic spec from `_no_split_modules`.
Layer indices: layer i is `get_layers(model)[i]`; its input is `hidden_states[i]` (`[0]` = embeddings).
The table also carries each family's rotation layout for a folded c Q (fold.py) and its GGUF mapping
(checkpoint/gguf.py); removing layers in place lives in removal.py.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ghosted.errors import GhostedError
from ghosted.json_io import parse_json

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationLayout:
    """Inside one decoder layer: each pre-norm and the linears that read it, and the residual writers; what
    fold.py needs to fold a rotation c Q of the residual stream into the weights."""

    readers: tuple[tuple[str, tuple[str, ...]], ...]  # (norm path, linears reading its output), in layer order
    writers: tuple[str, ...]  # linears whose output is added straight to the residual
    note: str = ""  # why this layout is exact for the family, where not obvious


@dataclass(frozen=True)
class GgufArch:
    """How the family maps onto a llama.cpp architecture (checkpoint/gguf.py)."""

    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool  # reorder Q/K head rows to llama.cpp's interleaved rotary pairs
    norm_offset: float  # added to every norm weight (Gemma: HF computes x * (1 + w))
    sliding_window: bool  # write the sliding window and the per-layer pattern


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its parts. Paths are dotted: model-level ones from the top CausalLM module,
    the others inside one decoder layer."""

    name: str
    architectures: tuple[str, ...]  # config.architectures[0] values (= CausalLM class names) covered
    model_type: tuple[str, ...]
    layers: str  # the nn.ModuleList of decoder layers, e.g. "model.layers"
    final_norm: str
    embed: str
    mlp: str  # inside a layer: the MLP whose output is added to the residual
    mlp_down: str  # inside a layer: the MLP's last projection
    attn_out: str  # inside a layer: the attention output projection
    down_is_conv1d: bool  # GPT-2 Conv1D: weight stored [in, out]
    fold_exact: bool  # layer output == residual after attention + raw MLP output
    scalar_fold_exact: bool  # a scalar on the residual stream folds exactly into attn_out/mlp_down weights
    residual_writers: tuple[str, ...]  # inside a layer: modules whose outputs are added straight to the residual
    num_layers_key: str  # config attribute holding the layer count
    per_layer_keys: tuple[str, ...]  # config lists with one entry per layer
    layer_idx_attrs: tuple[str, ...]  # inside a layer: attributes holding the layer's index (KV-cache slot)
    # Config flags that, when truthy, make a layer's computation depend on its index: removal is refused.
    unsupported_flags: tuple[str, ...] = ()
    # A folded rotation (--recovery foldable): the layout, or why the family cannot take one.
    rotation: RotationLayout | None = None
    rotation_refused: str = ""
    gguf: GgufArch | None = None  # GGUF export (ghosted export --gguf); None: not exportable
    notes: str = ""


_FIELDS = {f.name: f for f in dataclasses.fields(ArchSpec)}
_REQUIRED = {name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING}


def _spec_dir() -> Traversable:
    return resources.files("ghosted") / "_data" / "architectures"


def _parse_spec(raw: Any, source: str) -> ArchSpec:
    if not isinstance(raw, dict):
        raise GhostedError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise GhostedError(f"{source}: unknown keys {unknown}; allowed: {sorted(_FIELDS)}")
    missing = sorted(_REQUIRED - set(raw))
    if missing:
        raise GhostedError(f"{source}: missing keys {missing}")
    values = {key: _parse_value(key, _FIELDS[key].type, value, source) for key, value in raw.items()}
    spec = ArchSpec(**values)
    if not spec.architectures or not spec.model_type:
        raise GhostedError(f"{source}: 'architectures' and 'model_type' must not be empty")
    if spec.rotation is not None and spec.rotation_refused:
        raise GhostedError(f"{source}: give 'rotation' or 'rotation_refused', not both")
    return spec


def _parse_value(key: str, kind: str, value: Any, source: str) -> Any:
    if kind == "RotationLayout | None":
        return _parse_nested(RotationLayout, value, f"{source}: key {key!r}")
    if kind == "GgufArch | None":
        return _parse_nested(GgufArch, value, f"{source}: key {key!r}")
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "str":
        ok = isinstance(value, str) and (bool(value) or key in ("notes", "note", "rotation_refused"))
    elif kind == "tuple[tuple[str, tuple[str, ...]], ...]":  # JSON: {norm path: [linear paths]}
        ok = isinstance(value, dict) and all(isinstance(v, list) and v for v in value.values())
        value = tuple((k, _parse_value(k, "tuple[str, ...]", v, source)) for k, v in value.items()) if ok else value
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        value = tuple(value)
    if not ok:
        raise GhostedError(f"{source}: key {key!r} must be {kind} (lists as JSON arrays), got {value!r}")
    return value


def _parse_nested(cls: type, raw: Any, where: str) -> Any:
    """A nested JSON object as the frozen dataclass `cls` (strict: no unknown or missing keys)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        raise GhostedError(f"{where} must be a JSON object, got {raw!r}")
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw)
    if unknown or missing:
        raise GhostedError(f"{where}: unknown keys {unknown}, missing keys {missing}; allowed: {sorted(fields)}")
    return cls(**{k: _parse_value(k, fields[k].type, v, where) for k, v in raw.items()})


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, ArchSpec], dict[str, ArchSpec]]:
    """(by architecture, by model_type), parsed once from the package data."""
    by_arch: dict[str, ArchSpec] = {}
    by_type: dict[str, ArchSpec] = {}
    files = sorted((p for p in _spec_dir().iterdir() if p.name.endswith(".json")), key=lambda p: p.name)
    for path in files:
        source = f"architecture spec {path.name}"
        spec = _parse_spec(parse_json(path.read_bytes(), source, "architecture spec"), source)
        if spec.name != path.name.removesuffix(".json"):
            raise GhostedError(f"{source}: name {spec.name!r} must match the file name")
        for index, key in [(by_arch, a) for a in spec.architectures] + [(by_type, t) for t in spec.model_type]:
            if key in index:
                raise GhostedError(f"{source}: {key!r} is already covered by {index[key].name}.json")
            index[key] = spec
    return by_arch, by_type


def supported_architectures() -> list[str]:
    """Architecture class names with a spec in the table, sorted."""
    return sorted(_table()[0])


def gguf_spec(architecture: str | None) -> GgufArch | None:
    """The GGUF mapping of a `config.architectures[0]` name; None when the family has no GGUF export."""
    spec = _table()[0].get(architecture) if architecture is not None else None
    return None if spec is None else spec.gguf


def gguf_architectures() -> list[str]:
    """Architecture class names that export to GGUF, sorted."""
    by_arch = _table()[0]
    return [a for a in sorted(by_arch) if by_arch[a].gguf is not None]


def _resolves(model: nn.Module, spec: ArchSpec) -> bool:
    try:
        return isinstance(model.get_submodule(spec.layers), nn.ModuleList)
    except AttributeError:
        return False


def get_arch(model_or_config: nn.Module | PretrainedConfig) -> ArchSpec:
    """The spec of a model or config: by class or `architectures[0]`, then `model_type`, then (models only)
    a heuristic; GhostedError listing the supported architectures when nothing fits."""
    model = None if isinstance(model_or_config, PretrainedConfig) else model_or_config
    config = model_or_config if model is None else getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise GhostedError(
            f"cannot find the architecture of a {type(model_or_config).__name__}: pass a Hugging Face model or config"
        )
    by_arch, by_type = _table()
    declared: str | None = (getattr(config, "architectures", None) or [None])[0]
    # The object's own class first: a fresh model has no config.architectures, and a base model
    # (e.g. LlamaModel) lays its modules out differently from the CausalLM its config may name.
    keys = ([type(model).__name__] if model is not None else []) + [declared]
    keys.append((getattr(config, "ghosted", None) or {}).get("base_architecture"))  # a ghost checkpoint's base
    candidates = [by_arch[k] for k in keys if k in by_arch]
    if config.model_type in by_type:
        candidates.append(by_type[config.model_type])
    for spec in candidates:
        if model is None or _resolves(model, spec):
            return spec
    arch = declared or (type(model).__name__ if model is not None else config.model_type)
    guess = _heuristic_spec(model, config) if model is not None else None
    if guess is not None:
        _warn_heuristic(guess)
        return guess
    raise GhostedError(
        f"unsupported architecture {arch} (model_type {config.model_type!r}): supported are "
        f"{', '.join(supported_architectures())}; add a ghosted/_data/architectures/<family>.json for it"
    )


@cache
def _warn_heuristic(spec: ArchSpec) -> None:
    # Once per spec: get_layers() and friends resolve the spec on every call.
    logger.warning("architecture %s is not in the table; using a heuristic spec: %s", spec.architectures[0], spec)


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_features(module: nn.Module) -> int:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    # Conv1D keeps its weight as [in, out]; nn.Linear as [out, in].
    return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])


def _last_output_projection(module: nn.Module, hidden: int) -> str | None:
    names = [n for n, m in module.named_modules() if n and _is_projection(m) and _out_features(m) == hidden]
    return names[-1] if names else None


def _heuristic_spec(model: nn.Module, config: PretrainedConfig) -> ArchSpec | None:
    """A best-effort spec for a family not in the table, or None. Fold flags are always False."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    lists = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) and all(type(m).__name__ in block_names for m in mod)
    ]
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if callable(get_embed) else None
    if not lists or not isinstance(embed, nn.Embedding):
        return None
    layers_path, layers = max(lists, key=lambda item: len(item[1]))
    parent_path, _, _ = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    # The final norm sits next to the layer list; the last registered one if there are several.
    norms = [n for n, m in parent.named_children() if "norm" in type(m).__name__.lower() or n in ("ln_f", "norm_f")]
    embed_path = next((n for n, m in model.named_modules() if m is embed), None)
    layer = layers[0]
    children = list(layer.named_children())
    mlp = next((n for n, _ in children if "mlp" in n or n in ("feed_forward", "ffn", "ff")), None)
    attn = next((n for n, _ in children if "attn" in n or "attention" in n), None)
    hidden = embed.embedding_dim
    mlp_down = _last_output_projection(layer.get_submodule(mlp), hidden) if mlp else None
    attn_out = _last_output_projection(layer.get_submodule(attn), hidden) if attn else None
    if not (norms and embed_path and mlp and mlp_down and attn_out):
        return None
    num_layers_key = config.attribute_map.get("num_hidden_layers", "num_hidden_layers")
    if getattr(config, num_layers_key, None) != len(layers):
        return None
    per_layer_keys = sorted(
        k for k, v in config.to_dict().items() if "layer" in k and isinstance(v, list) and len(v) == len(layers)
    )
    layer_idx_attrs = [
        f"{n}.layer_idx" if n else "layer_idx"
        for n, m in layer.named_modules()
        if isinstance(getattr(m, "layer_idx", None), int)
    ]
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ArchSpec(
        name=f"heuristic:{arch}",
        architectures=(arch,),
        model_type=(config.model_type,),
        layers=layers_path,
        final_norm=f"{parent_path}.{norms[-1]}" if parent_path else norms[-1],
        embed=embed_path,
        mlp=mlp,
        mlp_down=f"{mlp}.{mlp_down}",
        attn_out=f"{attn}.{attn_out}",
        down_is_conv1d=type(layer.get_submodule(f"{mlp}.{mlp_down}")).__name__ == "Conv1D",
        fold_exact=False,
        scalar_fold_exact=False,
        residual_writers=(f"{attn}.{attn_out}", f"{mlp}.{mlp_down}"),
        num_layers_key=num_layers_key,
        per_layer_keys=tuple(per_layer_keys),
        layer_idx_attrs=tuple(layer_idx_attrs),
    )


def _model_submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise GhostedError(f"{type(model).__name__} has no {what} at {path!r}: the architecture spec is wrong") from err


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, in order."""
    layers = _model_submodule(model, get_arch(model).layers, "decoder layers")
    if not isinstance(layers, nn.ModuleList):
        raise GhostedError(f"decoder layers of {type(model).__name__} are a {type(layers).__name__}, not a ModuleList")
    return layers


def get_final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (before the LM head)."""
    return _model_submodule(model, get_arch(model).final_norm, "final norm")


def num_layers(model: nn.Module) -> int:
    """How many decoder layers the model has now."""
    return len(get_layers(model))


def layer_submodule(layer: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted `path` inside one decoder layer."""
    try:
        return layer.get_submodule(path)
    except AttributeError as err:
        raise GhostedError(f"decoder layer {type(layer).__name__} has no submodule {path!r}") from err
