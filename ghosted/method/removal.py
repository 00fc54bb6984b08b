"""Delete decoder layers in place and fix what refers to them (layer count, per-layer config lists, the layers'
own indices, `hf_device_map`), with an exact undo. Where each family keeps those is in the arch table."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from ghosted.errors import GhostedError
from ghosted.method import arch

# Config lists that transformers itself treats as one entry per layer, whatever the family.
_GENERIC_PER_LAYER_KEYS = ("layer_types", "mlp_layer_types")


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


def _pruned_lists(config: PretrainedConfig, spec: arch.ArchSpec, keep: list[int], n: int) -> dict[str, list[Any]]:
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


def _index_owner(layer: nn.Module, path: str, spec: arch.ArchSpec) -> tuple[nn.Module, str]:
    owner_path, _, attr = path.rpartition(".")
    owner = arch.layer_submodule(layer, owner_path) if owner_path else layer
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
    spec = arch.get_arch(model)
    layers = arch.get_layers(model)
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


def _index_values(layers: nn.ModuleList, spec: arch.ArchSpec) -> list[tuple[nn.Module, str, Any]]:
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
