"""The architecture table and in-place layer removal, checked exactly on tiny random models of every family."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM, Starcoder2Config

from ghosted.errors import GhostedError
from ghosted.method import arch
from ghosted.method.arch import (
    ArchSpec,
    get_arch,
    get_final_norm,
    get_layers,
    layer_submodule,
    num_layers,
    supported_architectures,
)
from ghosted.method.removal import remove_layers

try:
    from tests.tiny_models import FAMILIES, make_tiny, make_tiny_tokenizer
except ImportError:  # pragma: no cover - tests/ run without an __init__.py
    from tiny_models import FAMILIES, make_tiny, make_tiny_tokenizer  # type: ignore[no-redef]

# Independent of the JSON files: the per-layer config lists each family has in transformers 5.x.
EXPECTED_PER_LAYER = {
    "qwen2": ["layer_types"],
    "qwen3": ["layer_types"],
    "gemma2": ["layer_types"],
    "gemma3_text": ["layer_types"],
    "smollm3": ["layer_types", "no_rope_layers"],
}
SEQ_LEN = 10  # longer than the tiny sliding windows (4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: thread start-up and contention on a loaded machine cost 100x the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _ids(batch: int = 2, length: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _skipping(model: nn.Module, skip: Sequence[int]) -> Iterator[None]:
    """Run the dense model as if layers `skip` were identities (their output replaced by their input)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        h = _hidden_in(args, kwargs)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    layers = get_layers(model)
    handles = [layers[i].register_forward_hook(hook, with_kwargs=True) for i in skip]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _generate(model: nn.Module, use_cache: bool) -> torch.Tensor:
    prompt = _ids(batch=1, length=8, seed=1)
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        use_cache=use_cache,
    )


def _all_layer_idx(model: nn.Module) -> list[list[int]]:
    return [
        sorted({m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)})
        for layer in get_layers(model)
    ]


# --- the table -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_get_arch_resolves(family: str) -> None:
    model, _ = make_tiny(family)
    spec = get_arch(model)
    assert spec.name == family
    assert type(model).__name__ in spec.architectures
    assert model.config.model_type in spec.model_type
    assert get_arch(model.config) is spec  # by model_type: a fresh config has no `architectures`
    model.config.architectures = [type(model).__name__]
    assert get_arch(model.config) is spec
    assert type(model).__name__ in supported_architectures()


@pytest.mark.parametrize("family", FAMILIES)
def test_paths_exist(family: str) -> None:
    model, _ = make_tiny(family)
    spec = get_arch(model)
    hidden = model.get_input_embeddings().embedding_dim
    assert num_layers(model) == 4 == getattr(model.config, spec.num_layers_key)
    assert model.get_submodule(spec.embed) is model.get_input_embeddings()
    assert get_final_norm(model) is model.get_submodule(spec.final_norm)
    assert "norm" in type(get_final_norm(model)).__name__.lower()
    for i, layer in enumerate(get_layers(model)):
        assert type(layer).__name__ in model._no_split_modules
        down = layer_submodule(layer, spec.mlp_down)
        assert type(down).__name__ == ("Conv1D" if spec.down_is_conv1d else "Linear")
        out_dim = down.weight.shape[1] if spec.down_is_conv1d else down.weight.shape[0]
        assert out_dim == hidden
        assert layer_submodule(layer, spec.mlp_down) in set(layer_submodule(layer, spec.mlp).modules())
        assert isinstance(layer_submodule(layer, spec.attn_out), type(down))
        for path in spec.residual_writers:
            layer_submodule(layer, path)
        # The listed index attributes are exactly the ones the layer has.
        found = {f"{n}.layer_idx" if n else "layer_idx" for n, m in layer.named_modules() if hasattr(m, "layer_idx")}
        assert found == set(spec.layer_idx_attrs)
        for path in spec.layer_idx_attrs:
            owner, _, attr = path.rpartition(".")
            assert getattr(layer_submodule(layer, owner) if owner else layer, attr) == i
    assert sorted(spec.per_layer_keys) == EXPECTED_PER_LAYER.get(family, [])
    for key in spec.per_layer_keys:
        assert len(getattr(model.config, key)) == 4
    with pytest.raises(GhostedError, match="no submodule"):
        layer_submodule(get_layers(model)[0], "nope.proj")


@pytest.mark.parametrize("family", FAMILIES)
def test_heuristic_reproduces_table(family: str) -> None:
    model, _ = make_tiny(family)
    spec, guess = get_arch(model), arch._heuristic_spec(model, model.config)
    assert guess is not None and not guess.fold_exact and not guess.scalar_fold_exact
    for field in ("layers", "final_norm", "embed", "mlp", "mlp_down", "attn_out", "down_is_conv1d", "num_layers_key"):
        assert getattr(guess, field) == getattr(spec, field), field
    assert set(guess.per_layer_keys) == set(spec.per_layer_keys)
    assert set(guess.layer_idx_attrs) == set(spec.layer_idx_attrs)


def test_spec_json_is_strict() -> None:
    raw = json.loads((Path(arch.__file__).parents[1] / "_data" / "architectures" / "llama.json").read_text())
    assert isinstance(arch._parse_spec(raw, "llama.json"), ArchSpec)
    with pytest.raises(GhostedError, match="unknown keys.*bogus"):
        arch._parse_spec({**raw, "bogus": 1}, "x.json")
    with pytest.raises(GhostedError, match="missing keys.*final_norm"):
        arch._parse_spec({k: v for k, v in raw.items() if k != "final_norm"}, "x.json")
    with pytest.raises(GhostedError, match="fold_exact"):
        arch._parse_spec({**raw, "fold_exact": "yes"}, "x.json")
    with pytest.raises(GhostedError, match="per_layer_keys"):
        arch._parse_spec({**raw, "per_layer_keys": "layer_types"}, "x.json")


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(GhostedError) as err:
        get_arch(BertConfig())
    message = str(err.value)
    assert "bert" in message and "LlamaForCausalLM" in message and "Gemma3ForCausalLM" in message
    assert "\n" not in message
    # A model the heuristic cannot read (no MLP named as such, no norm next to the layers) fails the same way.
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(GhostedError, match="unsupported architecture BertForMaskedLM.*LlamaForCausalLM"):
        get_arch(bert)
    with pytest.raises(GhostedError, match="Linear"):
        get_arch(nn.Linear(2, 2))


def test_heuristic_family_end_to_end() -> None:
    """A family not in the table (Starcoder2) works through the heuristic spec."""
    config = Starcoder2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, sliding_window=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()  # models share a config object
    dense.load_state_dict(model.state_dict())
    spec = get_arch(model)
    assert spec.name == "heuristic:Starcoder2ForCausalLM"
    assert (spec.layers, spec.final_norm, spec.mlp_down, spec.attn_out) == (
        "model.layers", "model.norm", "mlp.c_proj", "self_attn.o_proj"
    )  # fmt: skip
    remove_layers(model, [1])
    with _skipping(dense, [1]):
        expected = dense(_ids()).logits
    torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)
    assert torch.equal(_generate(model, use_cache=True), _generate(model, use_cache=False))


# --- removal ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("remove", [[1], [0, 2]])
def test_remove_equals_skipping(family: str, remove: list[int]) -> None:
    model, _ = make_tiny(family)
    dense, _ = make_tiny(family)  # same seed: same weights
    spec = get_arch(model)
    layers_before = list(get_layers(model))
    lists_before = {k: list(getattr(model.config, k)) for k in spec.per_layer_keys}
    keep = [i for i in range(4) if i not in remove]

    remove_layers(model, remove)

    assert [id(m) for m in get_layers(model)] == [id(layers_before[i]) for i in keep]  # in place, no copies
    assert num_layers(model) == len(keep) == getattr(model.config, spec.num_layers_key)
    for key, before in lists_before.items():
        assert getattr(model.config, key) == [before[i] for i in keep]
    assert _all_layer_idx(model) == [[i] for i in range(len(keep))]

    ids = _ids()
    logits = model(ids).logits
    with _skipping(dense, remove):
        expected = dense(ids).logits
        expected_generation = _generate(dense, use_cache=False)
    assert not torch.allclose(logits, dense(ids).logits, atol=1e-3)  # the removed layers mattered
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    generated = _generate(model, use_cache=True)
    assert generated.shape[1] == 8 + 5
    assert torch.equal(generated, _generate(model, use_cache=False))
    assert torch.equal(generated, expected_generation)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trip(family: str, tmp_path: Path) -> None:
    model, tokenizer = make_tiny(family)
    spec = get_arch(model)
    layer_types = getattr(model.config, "layer_types", None)
    remove_layers(model, [1])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[spec.num_layers_key] == 3
    for key in spec.per_layer_keys:
        assert len(saved[key]) == 3
    if layer_types is not None:
        assert saved["layer_types"] == [layer_types[i] for i in (0, 2, 3)]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert num_layers(loaded) == 3
    ids = _ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(_generate(loaded, use_cache=True), _generate(model, use_cache=True))


def test_gemma3_layer_types_follow_the_layers() -> None:
    model, _ = make_tiny("gemma3_text")
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    remove_layers(model, [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert [layer.self_attn.is_sliding for layer in get_layers(model)] == [True, True, False]
    assert [layer.layer_idx for layer in get_layers(model)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("remove", "match"),
    [([4], "out of range"), ([-1], "out of range"), ([1, 1], "more than once"), ([0, 1, 2, 3], "all 4 layers"),
     ([1.5], "not an integer"), ([True], "not an integer")],
)  # fmt: skip
def test_bad_indices(remove: list[Any], match: str) -> None:
    model, _ = make_tiny("llama")
    with pytest.raises(GhostedError, match=match):
        remove_layers(model, remove)
    assert num_layers(model) == 4 == model.config.num_hidden_layers  # untouched


def test_numpy_and_tensor_indices() -> None:
    model, _ = make_tiny("llama")
    remove_layers(model, [torch.tensor(3), np.int64(0)])
    assert num_layers(model) == 2


def test_gpt2_index_dependent_scaling_refused() -> None:
    model, _ = make_tiny("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(GhostedError, match="scale_attn_by_inverse_layer_idx"):
        remove_layers(model, [1])
    assert num_layers(model) == 4


def test_inconsistent_per_layer_list_refused() -> None:
    model, _ = make_tiny("gemma3_text")
    model.config.layer_types = model.config.layer_types[:3]
    with pytest.raises(GhostedError, match="layer_types"):
        remove_layers(model, [1])
    assert num_layers(model) == 4


def test_heterogeneous_per_layer_config_rekeyed() -> None:
    model, _ = make_tiny("llama")
    model.config.per_layer_config = {1: {"rms_norm_eps": 1e-5}, 3: {"rms_norm_eps": 1e-4}}
    remove_layers(model, [1])
    assert model.config._heterogeneity_spec.per_layer_overrides == {2: {"rms_norm_eps": 1e-4}}


def test_device_map_renumbered() -> None:
    model, _ = make_tiny("llama")
    model.hf_device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.layers.2.mlp": 1,
        "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    remove_layers(model, [1])
    assert model.hf_device_map == {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.mlp": 1, "model.layers.2": "cpu",
        "model.norm": "cpu", "lm_head": "cpu",
    }  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("remove", [[1], [0, 2]])
def test_removal_undo_restores_the_model_exactly(family: str, remove: list[int]) -> None:
    """restore() gives back the same layer modules in the same ModuleList, the same config values (the very
    objects), the layers' indices and the dense logits and generation, bit for bit."""
    model, _ = make_tiny(family)
    spec = get_arch(model)
    layers = get_layers(model)
    modules = list(layers)
    keys = [spec.num_layers_key, *spec.per_layer_keys, *(k for k in ("layer_types", "mlp_layer_types")
                                                          if getattr(model.config, k, None) is not None)]
    values = {k: getattr(model.config, k) for k in keys}
    indices = _all_layer_idx(model)
    ids = _ids()
    logits, generated = model(ids).logits, _generate(model, use_cache=True)

    undo = remove_layers(model, remove)
    assert num_layers(model) == 4 - len(remove)
    undo.restore()

    assert get_layers(model) is layers and list(layers) == modules
    assert [name for name, _ in layers.named_children()] == ["0", "1", "2", "3"]
    assert all(getattr(model.config, k) is v for k, v in values.items())
    assert _all_layer_idx(model) == indices
    assert torch.equal(model(ids).logits, logits)
    assert torch.equal(_generate(model, use_cache=True), generated)
    with pytest.raises(RuntimeError, match="already undone"):
        undo.restore()


def test_removal_undo_restores_device_map_and_per_layer_config() -> None:
    model, _ = make_tiny("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model.hf_device_map = device_map
    model.config.per_layer_config = {1: {"rms_norm_eps": 1e-5}, 3: {"rms_norm_eps": 1e-4}}
    overrides = copy.deepcopy(model.config._heterogeneity_spec.per_layer_overrides)
    undo = remove_layers(model, [1])
    assert model.hf_device_map != device_map
    undo.restore()
    assert model.hf_device_map is device_map
    assert model.config._heterogeneity_spec.per_layer_overrides == overrides

    plain, _ = make_tiny("llama")  # a model without a device map gets none back
    remove_layers(plain, [1]).restore()
    assert not hasattr(plain, "hf_device_map")


# --- the fold flags, numerically -------------------------------------------------------------------------


def _layer_parts(model: nn.Module, index: int, zero_mlp: bool = False) -> dict[str, torch.Tensor]:
    """Input, output, attention-projection output and MLP output of layer `index` on one forward pass."""
    spec = get_arch(model)
    layer = get_layers(model)[index]
    parts: dict[str, torch.Tensor] = {}

    def on_layer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        parts["in"], parts["out"] = _hidden_in(args, kwargs), _first(output)

    def on_mlp(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        parts["mlp"] = output
        return torch.zeros_like(output) if zero_mlp else None

    def on_attn_out(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        parts["attn"] = output

    handles = [
        layer.register_forward_hook(on_layer, with_kwargs=True),
        layer_submodule(layer, spec.mlp).register_forward_hook(on_mlp),
        layer_submodule(layer, spec.attn_out).register_forward_hook(on_attn_out),
    ]
    for i, path in enumerate(spec.residual_writers):
        handles.append(layer_submodule(layer, path).register_forward_hook(lambda m, a, o, i=i: parts.update({i: o})))
    model(_ids())
    for handle in handles:
        handle.remove()
    return parts


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_fold_exact_by_parts(family: str) -> None:
    """The brief's check: layer output == input + attention projection + MLP output, for llama and not gemma3."""
    model, _ = make_tiny(family)
    p = _layer_parts(model, 1)
    exact = torch.allclose(p["out"], p["in"] + p["attn"] + p["mlp"], atol=1e-5)
    assert exact == get_arch(model).fold_exact == (family == "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_exact_definition(family: str) -> None:
    """fold_exact <=> layer output == (output with the MLP zeroed, i.e. residual after attention) + raw MLP output."""
    model, _ = make_tiny(family)
    full, without_mlp = _layer_parts(model, 1), _layer_parts(model, 1, zero_mlp=True)
    exact = torch.allclose(full["out"], without_mlp["out"] + full["mlp"], atol=1e-5)
    assert exact == get_arch(model).fold_exact


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_writers_sum_to_the_update(family: str) -> None:
    model, _ = make_tiny(family)
    spec = get_arch(model)
    p = _layer_parts(model, 2)
    scale = getattr(model.config, "residual_multiplier", 1.0)  # Granite scales what its writers add
    update = sum(p[i] for i in range(len(spec.residual_writers)))
    torch.testing.assert_close(p["out"], p["in"] + scale * update, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_fold_exact(family: str) -> None:
    """scalar_fold_exact <=> scaling the residual stream at layer 1 by c and the attn_out / mlp_down weights of
    layers >= 1 by c leaves the logits unchanged (every read is scale-invariant, every write scales)."""
    model, _ = make_tiny(family)
    spec = get_arch(model)
    ids = _ids()
    reference = model(ids).logits
    c = 3.0
    layers = get_layers(model)
    for layer in list(layers)[1:]:
        for path in (spec.attn_out, spec.mlp_down):
            proj = layer_submodule(layer, path)
            proj.weight.mul_(c)
            if proj.bias is not None:
                proj.bias.mul_(c)

    def scale_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (args[0] * c, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * c}

    handle = layers[1].register_forward_pre_hook(scale_input, with_kwargs=True)
    scaled = model(ids).logits
    handle.remove()
    assert torch.allclose(scaled, reference, atol=2e-4, rtol=1e-4) == spec.scalar_fold_exact


# --- the tiny fixtures themselves ------------------------------------------------------------------------


def test_tiny_tokenizer_round_trip(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    ids = tokenizer("The quick brown fox.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and max(ids) < 128
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("The quick brown fox.")["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == "The quick brown fox."
