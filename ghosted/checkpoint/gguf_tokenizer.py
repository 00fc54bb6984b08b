"""The tokenizer of a GGUF export: copied from the GGUF the base model came from when it is at hand and matches,
else written from the checkpoint's Hugging Face tokenizer files."""

from __future__ import annotations

from pathlib import Path

from ghosted.checkpoint.meta import CheckpointMeta
from ghosted.errors import GhostedError, brief
from ghosted.json_io import read_json

TOKENIZER_MAX_BYTES = 64 << 20  # a tokenizer.json holds the vocabulary and merges: ~10 MB for a 128k vocabulary


def read_gguf(source: Path):
    """A GGUF file's header and metadata (gguf.GGUFReader); a file that is not a valid GGUF is one line."""
    import gguf

    try:
        return gguf.GGUFReader(str(source))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, EOFError) as exc:
        raise GhostedError(f"{source}: not a valid GGUF file ({type(exc).__name__}: {brief(str(exc), 120)}); "
                           "give the .gguf the model came from, unchanged") from None


def source_gguf(ckpt: Path, cfg: dict) -> Path | None:
    """The GGUF the base model came from, when it is at hand and matches the recorded fingerprint."""
    from ghosted.models import SHIPPED, file_sha256, shipped_gguf, source_record

    meta = CheckpointMeta.from_dict(cfg.get("ghosted") or {}).to_dict()
    candidates: list[Path] = []
    src = ckpt / "ghosted_source.json"  # a converted shipped model folder itself
    if src.is_file():
        candidates.append(Path(source_record(ckpt)["gguf"]))
    base = meta.get("base_model")
    if base in SHIPPED:
        try:
            candidates.append(shipped_gguf(base))
        except GhostedError:
            pass
    elif base and str(base).endswith(".gguf"):
        candidates.append(Path(base).expanduser())
    elif base and (Path(base).expanduser() / "ghosted_source.json").is_file():
        candidates.append(Path(source_record(Path(base).expanduser())["gguf"]))
    want = meta.get("base_fingerprint")
    for path in candidates:
        if not path.is_file():
            continue
        if want and want.startswith("sha256:") and file_sha256(path) != want.split(":", 1)[1]:
            continue  # a different file now sits at that path: its tokenizer may not be the checkpoint's
        return path
    return None


def copy_gguf_tokenizer(writer, source: Path) -> None:
    import gguf

    reader = read_gguf(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


# llama.cpp picks its pre-tokenizer regex by name; these are the tokenizer.json layouts we can name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_pre_name(pre: dict | None) -> str | None:
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"
        if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
                and not steps[1].get("use_regex", True)):
            return "llama-bpe"
    return None


def write_hf_tokenizer(writer, ckpt: Path) -> str:
    """Byte-level BPE from tokenizer.json: tokens, merges, token types, special ids."""
    import gguf

    tj = ckpt / "tokenizer.json"
    if not tj.is_file():
        raise GhostedError(f"{ckpt} has no tokenizer.json and its base model's GGUF is not at hand: "
                           "cannot write the tokenizer llama.cpp needs")
    data = read_json(tj, "tokenizer.json", expect=dict, max_bytes=TOKENIZER_MAX_BYTES)
    model = data.get("model") or {}
    pre = _bpe_pre_name(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise GhostedError(
            f"{tj}: only byte-level BPE tokenizers with a GPT-2, SmolLM or Llama 3 pre-tokenizer can be written "
            f"from tokenizer.json (this one: model {model.get('type')}, pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')}); export from a base model given as a .gguf instead"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        t = added.get(tok)
        types[i] = gguf.TokenType.NORMAL if t is None else (
            gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    tc_path = ckpt / "tokenizer_config.json"
    tc = read_json(tc_path, "tokenizer config", expect=dict) if tc_path.is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            add(vocab[tok])
    post = data.get("post_processor") or {}
    bos_first = post.get("type") == "TemplateProcessing" and any("SpecialToken" in x for x in post.get("single", [])[:1])
    writer.add_add_bos_token(bool(bos_first))
    if tc.get("chat_template"):
        writer.add_chat_template(tc["chat_template"])
    elif (ckpt / "chat_template.jinja").is_file():
        writer.add_chat_template((ckpt / "chat_template.jinja").read_text(encoding="utf-8"))
    return f"{tj.name} (BPE, pre-tokenizer {pre})"


def check_vocab(ckpt: Path, source: Path, vocab_size: int) -> None:
    """The base GGUF's token list must be the checkpoint's (same strings at the same ids)."""

    field = read_gguf(source).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise GhostedError(f"{source} has no tokenizer.ggml.tokens: cannot take the tokenizer from it")
    tokens = field.contents()
    if len(tokens) != vocab_size:
        raise GhostedError(f"{source} has {len(tokens)} tokens, the checkpoint's vocabulary {vocab_size}: "
                           "not the tokenizer of this checkpoint")
    tj = ckpt / "tokenizer.json"
    if tj.is_file():
        data = read_json(tj, "tokenizer.json", expect=dict, max_bytes=TOKENIZER_MAX_BYTES)
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            bad = [t for t, i in vocab.items() if i < len(tokens) and tokens[i] != t]
            if bad:
                raise GhostedError(f"{source}: {len(bad)} token(s) differ from {tj} (e.g. {bad[0]!r}): "
                                   "not the tokenizer of this checkpoint")


# ---------------------------------------------------------------------------------------------------------
# Hyper-parameters
