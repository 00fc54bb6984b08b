"""Architecture adapters: where each model family keeps its layers, norms and projections.

Families are data (`ghosted/_data/architectures/<family>.json`), looked up by `config.architectures[0]` (or the
model's class) and then `config.model_type`; unknown families get a heuristic spec from `_no_split_modules`.
Layer indices: layer i is `get_layers(model)[i]`; its input is `hidden_states[i]` (`[0]` = embeddings).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PretrainedConfig

from ghosted.errors import GhostedError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger(__name__)

# Config lists that transformers itself treats as one entry per layer, whatever the family.
_GENERIC_PER_LAYER_KEYS = ("layer_types", "mlp_layer_types")


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
    values: dict[str, Any] = {}
    for key, value in raw.items():
        kind = _FIELDS[key].type
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str) and (bool(value) or key == "notes")
        else:  # tuple[str, ...]
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            value = tuple(value)
        if not ok:
            raise GhostedError(f"{source}: key {key!r} must be {kind} (lists as JSON arrays), got {value!r}")
        values[key] = value
    spec = ArchSpec(**values)
    if not spec.architectures or not spec.model_type:
        raise GhostedError(f"{source}: 'architectures' and 'model_type' must not be empty")
    return spec


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, ArchSpec], dict[str, ArchSpec]]:
    """(by architecture, by model_type), parsed once from the package data."""
    by_arch: dict[str, ArchSpec] = {}
    by_type: dict[str, ArchSpec] = {}
    files = sorted((p for p in _spec_dir().iterdir() if p.name.endswith(".json")), key=lambda p: p.name)
    for path in files:
        source = f"architecture spec {path.name}"
        spec = _parse_spec(json.loads(path.read_text(encoding="utf-8")), source)
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


def _validate_removal(remove: Sequence[int], n: int) -> list[int]:
    indices: list[int] = []
    for i in remove:
        try:
            if isinstance(i, bool):
                raise TypeError
            indices.append(operator.index(i))
        except TypeError:
            raise GhostedError(f"layer index {i!r} is not an integer; give indices in [0, {n})") from None
    for i in indices:
        if not 0 <= i < n:
            raise GhostedError(f"layer index {i} is out of range: the model has {n} layers, indices 0..{n - 1}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise GhostedError(f"layer indices {duplicates} are listed more than once; give each layer once")
    if len(indices) >= n:
        raise GhostedError(f"cannot remove all {n} layers; keep at least one")
    return sorted(indices)


def _pruned_lists(config: PretrainedConfig, spec: ArchSpec, keep: list[int], n: int) -> dict[str, list[Any]]:
    """New values of the per-layer config lists; checked before anything is changed."""
    out: dict[str, list[Any]] = {}
    for key in dict.fromkeys(spec.per_layer_keys + _GENERIC_PER_LAYER_KEYS):
        value = getattr(config, key, None)
        if value is None and key not in spec.per_layer_keys:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise GhostedError(
                f"config.{key} should list one entry per layer ({n}) but is {value!r}; fix the model's config"
            )
        out[key] = [value[i] for i in keep]
    return out


def _index_owner(layer: nn.Module, path: str, spec: ArchSpec) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    owner = layer_submodule(layer, owner_path) if owner_path else layer
    if not hasattr(owner, attr):
        raise GhostedError(f"{spec.name}: decoder layer has no attribute {path!r}; the spec is wrong")
    return owner, attr


def _renumber_device_map(model: nn.Module, layers_path: str, keep: list[int]) -> None:
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    prefix = layers_path + "."
    new_position = {str(old): str(new) for new, old in enumerate(keep)}
    renumbered: dict[str, Any] = {}
    for key, device in device_map.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if index not in new_position:
                continue  # a removed layer
            key = prefix + new_position[index] + ("." + rest if rest else "")
        renumbered[key] = device
    model.hf_device_map = renumbered  # type: ignore[assignment]


_ABSENT = object()  # an attribute the model did not have


@dataclass
class RemovalUndo:
    """Everything remove_layers changed, kept so that restore() puts the model back exactly: the same layer
    modules in the same ModuleList, the same config values (layer count, per-layer lists, per-layer config),
    the layers' own indices and `hf_device_map`."""

    model: nn.Module
    layers: nn.ModuleList
    removed: list[tuple[int, nn.Module]]  # (dense index, layer)
    config: PretrainedConfig
    config_values: dict[str, Any]  # key -> the value before removal (the objects themselves, never mutated)
    heterogeneity: Any  # config._heterogeneity_spec before removal, or None (then removal left it alone)
    layer_idx: list[tuple[nn.Module, str, Any]]  # (owner, attribute, value before removal)
    device_map: Any = _ABSENT
    restored: bool = False

    def restore(self) -> None:
        """Put back what remove_layers changed. Once only."""
        if self.restored:
            raise RuntimeError("this layer removal was already undone")
        for i, layer in self.removed:  # ascending: each insert lands at its dense index
            self.layers.insert(i, layer)
        for key, value in self.config_values.items():
            setattr(self.config, key, value)
        if self.heterogeneity is not None:
            # The spec object from before removal (remove_layers set a new one and left this one untouched).
            self.config._heterogeneity_spec = self.heterogeneity
        for owner, attr, value in self.layer_idx:
            setattr(owner, attr, value)
        if self.device_map is _ABSENT:
            if hasattr(self.model, "hf_device_map"):
                del self.model.hf_device_map
        else:
            self.model.hf_device_map = self.device_map  # type: ignore[assignment]
        self.restored = True


def remove_layers(model: nn.Module, remove: Sequence[int]) -> RemovalUndo:
    """Delete the decoder layers at `remove` in place and fix the config and layer indices so that
    generation with a KV cache and save_pretrained -> from_pretrained work on the smaller model.
    Returns the undo snapshot (RemovalUndo.restore puts the dense model back exactly)."""
    spec = get_arch(model)
    layers = get_layers(model)
    n = len(layers)
    removed = _validate_removal(remove, n)
    keep = sorted(set(range(n)) - set(removed))
    # Composite models (e.g. vision-language) keep the decoder's keys in a sub-config.
    config: PretrainedConfig = model.config.get_text_config(decoder=True)  # type: ignore[operator,union-attr]
    for flag in spec.unsupported_flags:
        if getattr(config, flag, False):
            raise GhostedError(
                f"config.{flag} is set: {spec.name} layers then compute with their own index, so removing layers "
                "cannot give an exact standard checkpoint"
            )
    lists = _pruned_lists(config, spec, keep, n)
    for layer in layers:  # fail before anything changes
        for path in spec.layer_idx_attrs:
            _index_owner(layer, path, spec)
    heterogeneity = getattr(config, "_heterogeneity_spec", None)  # transformers' sparse per_layer_config
    undo = RemovalUndo(
        model, layers, [(i, layers[i]) for i in removed], config,
        {key: getattr(config, key) for key in (spec.num_layers_key, *lists)}, heterogeneity,
        _index_values(layers, spec), getattr(model, "hf_device_map", _ABSENT),
    )  # fmt: skip

    for i in reversed(removed):
        del layers[i]  # ModuleList renames the remaining children 0..len-1
    for new, (old, layer) in enumerate(zip(keep, layers, strict=True)):
        for path in spec.layer_idx_attrs:
            setattr(*_index_owner(layer, path, spec), new)
        # Also any other submodule still holding the old index (e.g. GPT-2 cross-attention), which the KV
        # cache would otherwise index wrongly.
        for module in layer.modules():
            if getattr(module, "layer_idx", None) == old and not isinstance(module.layer_idx, bool):
                module.layer_idx = new  # type: ignore[assignment]

    setattr(config, spec.num_layers_key, len(keep))
    for key, value in lists.items():
        setattr(config, key, value)
    if heterogeneity is not None:
        overrides = heterogeneity.per_layer_overrides
        rekeyed: dict[int | str, dict[str, Any]] = {
            new: copy.deepcopy(overrides[old]) for new, old in enumerate(keep) if old in overrides
        }
        config.per_layer_config = rekeyed or None
    _renumber_device_map(model, spec.layers, keep)
    return undo


def _index_values(layers: nn.ModuleList, spec: ArchSpec) -> list[tuple[nn.Module, str, Any]]:
    """Every layer-index attribute remove_layers may renumber, with its current value."""
    out: list[tuple[nn.Module, str, Any]] = []
    for layer in layers:
        for path in spec.layer_idx_attrs:
            owner, attr = _index_owner(layer, path, spec)
            out.append((owner, attr, getattr(owner, attr)))
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                out.append((module, "layer_idx", module.layer_idx))
    return out
