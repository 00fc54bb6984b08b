"""ghosted export --gguf of an exportable ghost: llama.cpp's deci architecture, one extra layer per cut.

Read back with the `gguf` package's reader; the layers' arithmetic (deci.cpp: linear attention, SwiGLU with
biases) is recomputed from the file's tensors and compared with the checkpoint's own ghost module. llama.cpp
itself runs the file in scripts/gguf_llamacpp_check.py (an optional extra, not in CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ghosted._remote.modeling_ghosted import Ghost
from ghosted.checkpoint.gguf_deci import GHOST_FF
from tests.checkpoint.test_export import _run, make_tiny_folder, text_file  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny-deci") / "tiny-llama", "llama")


def _prune(capsys, folder: Path, text: Path, out: Path, *extra) -> Path:
    code, _, err = _run(capsys, "prune", folder, "--layers", "2-3", "--calib-source", text, "--n-seqs", 8,
                        "--seq-len", 16, "--out", out, "--quiet", *extra)
    assert code == 0, err
    return out


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    vals = [f.parts[i].tolist() for i in f.data]
    return [v[0] if isinstance(v, list) and len(v) == 1 else v for v in vals]


def _tensors(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    # the reader gives numpy arrays in GGUF order (ne reversed): the same [out, in] layout the writer was handed
    return {t.name: np.asarray(t.data, dtype=np.float64).reshape([int(x) for x in reversed(t.shape)])
            for t in reader.tensors}


def _rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


def _deci_layer(x: np.ndarray, t: dict[str, np.ndarray], j: int, n_head: int, eps: float) -> np.ndarray:
    """One deci layer as deci.cpp computes it, for the two kinds a ghost uses (no attention: n_head 0;
    linear attention: heads but no KV heads)."""
    p = f"blk.{j}."
    if n_head == 0:
        ffn_inp = x
    else:
        ffn_inp = x + (_rms_norm(x, eps) * t[p + "attn_norm.weight"]) @ t[p + "attn_output.weight"].T
    u = _rms_norm(ffn_inp, eps) * t[p + "ffn_norm.weight"]
    gate = u @ t[p + "ffn_gate.weight"].T + t.get(p + "ffn_gate.bias", 0.0)
    up = u @ t[p + "ffn_up.weight"].T + t.get(p + "ffn_up.bias", 0.0)
    return ffn_inp + (_silu(gate) * up) @ t[p + "ffn_down.weight"].T + t.get(p + "ffn_down.bias", 0.0)


@pytest.mark.parametrize("policy", ["detect", "anchor"])
def test_exportable_ghost_is_a_deci_gguf_that_computes_the_ghost(policy, tiny_llama, text_file, tmp_path,  # noqa: F811
                                                                capsys):
    ckpt = _prune(capsys, tiny_llama, text_file, tmp_path / "ghost", "--exportable", "--token-policy", policy,
                  "--guard", "off")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ghost,) = cfg["ghosted"]["ghosts"]
    assert ghost["site"] == 2 and ghost["norm"] and ghost["raw"] is False and bool(ghost.get("detect")) == (policy == "detect")
    out = tmp_path / "g.gguf"
    code, stdout, err = _run(capsys, "export", ckpt, "--gguf", out, "--outtype", "f32")
    assert code == 0, err
    assert "deci" in stdout

    reader = gguf.GGUFReader(str(out))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "deci"
    n_head, n_kv, ff = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    kinds = ["kept", "kept", *(["detect"] if policy == "detect" else []), "ghost", "kept", "kept"]
    assert _field(reader, "deci.block_count") == [len(kinds)]
    assert _field(reader, "deci.attention.head_count") == [0 if k == "detect" else n_head for k in kinds]
    assert _field(reader, "deci.attention.head_count_kv") == [n_kv if k == "kept" else 0 for k in kinds]
    assert _field(reader, "deci.feed_forward_length") == [ff if k == "kept" else GHOST_FF for k in kinds]

    t = _tensors(reader)
    sd = load_file(str(ckpt / "model.ghosted.safetensors"))
    g = kinds.index("ghost")
    np.testing.assert_array_equal(t[f"blk.{g}.attn_output.weight"], sd["ghosts.2.norm_weight"].double().T.numpy())
    np.testing.assert_array_equal(t[f"blk.{g}.ffn_down.bias"], sd["ghosts.2.bias"].double().numpy())
    assert not np.any(t[f"blk.{g}.ffn_down.weight"]) and f"blk.{g}.attn_q.weight" not in t
    # kept layers keep their weights, renumbered around the ghost: pruned layer 2 is block g + 1
    np.testing.assert_array_equal(t[f"blk.{g + 1}.ffn_down.weight"], sd["model.layers.2.mlp.down_proj.weight"].double())

    # the file's layers compute the checkpoint's ghost (llama.cpp's arithmetic, recomputed from its tensors)
    d = cfg["hidden_size"]
    module = Ghost(d, bias=True, norm=True, detect=policy == "detect").double()
    module.load_state_dict({k.split(".", 2)[2]: v.double() for k, v in sd.items() if k.startswith("ghosts.2.")})
    h = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    if policy == "detect":  # some tokens the detector picks: the left-out tokens' direction
        h[:4] = h[:4] * 0.01 + 5 * module.detect_weight.detach() / module.detect_weight.detach().norm() * d ** 0.5
    with torch.no_grad():
        want = module(h[None])[0].numpy()
    x = h.numpy()
    for j, kind in enumerate(kinds[: g + 1]):
        if kind != "kept":
            x = _deci_layer(x, t, j, 0 if kind == "detect" else n_head, 1e-6)
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_ghost_with_a_map_of_h_is_refused_in_one_line(tiny_llama, text_file, tmp_path, capsys):  # noqa: F811
    ckpt = _prune(capsys, tiny_llama, text_file, tmp_path / "ghost", "--norm-features", "--guard", "off")
    code, _, err = _run(capsys, "export", ckpt, "--gguf", tmp_path / "g.gguf")
    assert code == 2 and err.count("\n") == 1 and "--exportable" in err and "maps h itself" in err, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".g.gguf*"))


def test_exportable_refuses_what_llama_cpp_cannot_run(tiny_llama, capsys):
    for extra, needle in ((["--token-policy", "sink"], "position 0"), (["--rank", "2"], "--rank"),
                          (["--recovery", "linearpatch"], "--recovery ghost")):
        code, _, err = _run(capsys, "prune", tiny_llama, "--layers", "2-3", "--exportable", *extra, "--out", "/x")
        assert code == 2 and needle in err and err.count("\n") == 1, err


def test_the_searched_plan_of_an_exportable_config_exports_to_deci(tiny_llama, text_file, tmp_path, capsys):  # noqa: F811
    """params.yaml's prune.exportable reaches the search: every candidate it screens and the checkpoint it chooses
    (one or two cuts) are exportable ghosts, so the champion a search picks runs in llama.cpp."""
    params = tmp_path / "params.yaml"
    params.write_text(f"calibration: {{source: {text_file}, n: 8, seq_len: 16}}\n"
                      "prune: {select: angular, recovery: ghost, exportable: true}\n"
                      f"eval: {{ppl: {text_file}, ppl_windows: 1, seq_len: 16, tasks: none}}\n"
                      f"gate: {{max_ppl_ratio: 1000.0, min_retained_acc: null, rank_by: {text_file}}}\n"
                      "search: {min_remove: 1, max_remove: 3, split_shortlist: 1}\n")
    out = tmp_path / "search"
    code, stdout, err = _run(capsys, "search", tiny_llama, "--config", params, "--out", out, "--quiet")
    assert code == 0, stdout + err
    ckpt = out / "checkpoint"
    ghosts = json.loads((ckpt / "config.json").read_text())["ghosted"]["ghosts"]
    assert ghosts and all(g["norm"] and g["raw"] is False for g in ghosts)
    code, stdout, err = _run(capsys, "export", ckpt, "--gguf", tmp_path / "s.gguf", "--outtype", "f32")
    assert code == 0 and "deci" in stdout, err
    reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
    n_kv = _field(reader, "deci.attention.head_count_kv")
    assert n_kv.count(0) >= len(ghosts)  # one linear-attention layer per cut (plus any detector layers)
