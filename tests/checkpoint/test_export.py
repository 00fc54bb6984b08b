"""ghosted export --gguf: read back by transformers' own GGUF loader (and by llama.cpp in scripts/)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ghosted.checkpoint.gguf import permute_qk
from ghosted.cli import main
from tests.tiny_models import tiny_config

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog, and layer pruning removes blocks. " * 3
    for i in range(60)
)


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained in memory (offline), the kind llama.cpp's gpt2 vocab reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def make_tiny_folder(path: Path, family: str, num_layers: int = 6) -> Path:
    tok = _byte_level_tokenizer()
    cfg = tiny_config(family, num_layers)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _prune(capsys, folder: Path, text_file: Path, out: Path, recovery: str, *extra) -> Path:
    code, _, err = _run(capsys, "prune", folder, "--layers", "2-3", "--recovery", recovery, "--calib-source", text_file,
                        "--n-seqs", 6, "--seq-len", 16, "--out", out, "--quiet", *extra)
    assert code == 0, err
    return out


def _load_gguf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_permute_qk_is_llama_cpp_interleaving():
    """Head h's rows (a0..a3 | b0..b3) become (a0 b0 a1 b1 ...): rotary pairs adjacent, as llama.cpp applies RoPE."""
    w = torch.arange(16.0).reshape(16, 1)  # 2 heads of head_dim 8
    got = permute_qk(w, 2).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("recovery", ["none", "scalar", "replaceme"])
def test_plain_checkpoint_round_trips_through_transformers_gguf_loader(recovery, tiny_llama, text_file, tmp_path,
                                                                      capsys):
    ckpt = _prune(capsys, tiny_llama, text_file, tmp_path / "ckpt", recovery)
    out = tmp_path / "m.gguf"
    code, stdout, err = _run(capsys, "export", ckpt, "--gguf", out, "--outtype", "f32")
    assert code == 0, err
    assert "4 layers" in stdout and "pre-tokenizer gpt-2" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    folder = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    loaded = _load_gguf(out)
    assert loaded.config.num_hidden_layers == 4
    sd_folder, sd_gguf = folder.state_dict(), loaded.state_dict()
    assert set(sd_folder) == set(sd_gguf)
    for k, v in sd_folder.items():  # f32: transformers' loader undoes our Q/K permutation exactly
        assert torch.equal(v, sd_gguf[k]), k
    ids = torch.randint(0, folder.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, folder(ids).logits, rtol=0, atol=1e-5)
    tok_folder = AutoTokenizer.from_pretrained(ckpt)
    tok_gguf = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = "the quick brown fox, 42 layers"
    assert tok_gguf(text).input_ids == tok_folder(text).input_ids


def test_outtypes_store_matrices_at_that_type_and_norms_in_f32(tiny_llama, tmp_path, capsys):
    folder = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(0, folder.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = folder(ids).logits
    for outtype, qtype in (("f16", gguf.GGMLQuantizationType.F16), ("bf16", gguf.GGMLQuantizationType.BF16)):
        out = tmp_path / f"m-{outtype}.gguf"
        code, _, err = _run(capsys, "export", tiny_llama, "--gguf", out, "--outtype", outtype)
        assert code == 0, err
        reader = gguf.GGUFReader(str(out))
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == qtype and types["token_embd.weight"] == qtype
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
        assert reader.fields["llama.block_count"].contents() == 6
        with torch.no_grad():
            got = _load_gguf(out)(ids).logits
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_ghost_checkpoint_is_refused_pointing_at_foldable(tiny_llama, text_file, tmp_path, capsys):
    ckpt = _prune(capsys, tiny_llama, text_file, tmp_path / "ghost", "ghost", "--guard", "off")
    assert json.loads((ckpt / "config.json").read_text())["ghosted"]["ghosts"]
    out = tmp_path / "g.gguf"
    code, _, err = _run(capsys, "export", ckpt, "--gguf", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ghosted: error:") and "--recovery foldable" in lines[0], err
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".g.gguf*")) == []


def test_ghost_tensors_or_ghosted_model_type_are_refused(tiny_llama, tmp_path, capsys):
    """Whatever marks the ghost (lineage block, model_type, stray ghosts.* tensors), no silent export."""
    from safetensors.torch import load_file, save_file

    for mark in ("model_type", "tensor"):
        ckpt = tmp_path / mark
        ckpt.mkdir()
        for f in tiny_llama.iterdir():
            (ckpt / f.name).write_bytes(f.read_bytes())
        if mark == "model_type":
            cfg = json.loads((ckpt / "config.json").read_text())
            cfg["model_type"] = "ghosted"
            (ckpt / "config.json").write_text(json.dumps(cfg))
        else:
            sd = load_file(str(ckpt / "model.safetensors"))
            sd["ghosts.cut0.W"] = torch.eye(4)
            save_file(sd, str(ckpt / "model.safetensors"))
        code, _, err = _run(capsys, "export", ckpt, "--gguf", tmp_path / "x.gguf")
        assert code == 2 and "--recovery foldable" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["MISSING", "--gguf", "OUT/x.gguf"], "model path not found"),
    (["TINY", "--gguf", "OUT/x.bin"], "must end in .gguf"),
    (["TINY", "--gguf", "OUT/x.gguf", "--outtype", "q4_0"], "unknown --outtype 'q4_0'"),
    (["QWEN", "--gguf", "OUT/x.gguf"], "has no GGUF export yet; supported: Gemma3ForCausalLM, LlamaForCausalLM"),
])
def test_bad_input_is_one_error_line(argv, message, tiny_llama, tmp_path, capsys):
    qwen = make_tiny_folder(tmp_path / "qwen", "qwen2", num_layers=2)
    capsys.readouterr()  # save_pretrained's progress bar
    subs = {"MISSING": str(tmp_path / "nope"), "TINY": str(tiny_llama), "QWEN": str(qwen)}
    argv = [subs.get(a, a).replace("OUT", str(tmp_path / "out")) for a in argv]
    code, _, err = _run(capsys, "export", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("ghosted: error:") and message in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gemma3_writes_offset_norms_and_the_pruned_layer_pattern(tmp_path, capsys):
    """Gemma 3: norms +1 (llama.cpp multiplies by w), and the per-layer sliding pattern survives pruning."""
    folder = make_tiny_folder(tmp_path / "gemma", "gemma3_text", num_layers=4)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "g.gguf"
    code, _, err = _run(capsys, "export", folder, "--gguf", out, "--outtype", "f32")
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False, False, True]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tensors = {t.name: t for t in reader.tensors}
    norm = torch.from_numpy(tensors["blk.1.attn_q_norm.weight"].data.copy())
    assert torch.equal(norm, model.model.layers[1].self_attn.q_norm.weight.detach() + 1)
    # transformers' GGUF loader subtracts the 1 again: every weight round-trips.
    loaded = _load_gguf(out)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, loaded.state_dict()[k], atol=1e-6), k


@pytest.mark.integration
def test_shipped_smollm2_pruned_gguf_predicts_like_the_folder(tmp_path, capsys):
    """Pruned SmolLM2 (13-18 removed, scalar fold) -> GGUF f32 -> transformers: same next tokens on wiki text."""
    from ghosted.corpora import load_documents, make_windows

    ckpt = tmp_path / "smol"
    code, _, err = _run(capsys, "prune", "smollm2-135m", "--layers", "13-18", "--recovery", "scalar",
                        "--n-seqs", 4, "--seq-len", 64, "--out", ckpt, "--quiet")
    assert code == 0, err
    out = tmp_path / "smol.gguf"
    code, stdout, err = _run(capsys, "export", ckpt, "--gguf", out, "--outtype", "f32")
    assert code == 0, err
    assert "24 layers" in stdout and "copied from SmolLM2-135M-Instruct" in stdout
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["llama.block_count"].contents() == 24
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    folder = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    loaded = _load_gguf(out)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = make_windows(tok, load_documents("wiki"), 192, 2)  # 384 tokens
    with torch.no_grad():
        ref, got = folder(ids).logits, loaded(ids).logits
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert (got - ref).abs().max() < 1e-3
    # The tokenizer written from tokenizer.json alone has the base GGUF's tokens, merges and types.
    from ghosted.checkpoint.gguf_tokenizer import write_hf_tokenizer as _write_hf_tokenizer

    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    _write_hf_tokenizer(w, ckpt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    mine = gguf.GGUFReader(str(tmp_path / "tok.gguf")).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert mine[key].contents() == reader.fields[key].contents(), key
