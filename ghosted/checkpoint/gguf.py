"""Export a plain (ghost-free) checkpoint as one GGUF file that llama.cpp runs.

Tensor names come from the `gguf` package's own name map (the one llama.cpp's converter uses), so
`model.layers.N.self_attn.q_proj.weight` becomes `blk.N.attn_q.weight`. Two layout differences from
the Hugging Face weights, both as llama.cpp's converter applies them and transformers' GGUF loader
undoes them:
- llama family: the rows of each Q and K head are reordered from HF's rotate-half layout (first
  half, second half) to llama.cpp's interleaved rotary pairs;
- Gemma 3: llama.cpp multiplies by a norm weight `w`, HF by `1 + w`, so every norm weight gets +1.
The tokenizer is copied from the base model's source GGUF when there is one (shipped models), or
built from the checkpoint's tokenizer.json (byte-level BPE). A ghost checkpoint of a Llama-family model whose
ghosts have the exportable form is written as llama.cpp's `deci` architecture, one extra layer per cut
(checkpoint/gguf_deci.py); any other ghost is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ghosted.checkpoint import gguf_deci
from ghosted.checkpoint.format import MODEL_TYPE, VARIANT, param_counts
from ghosted.checkpoint.gguf_tokenizer import check_vocab, copy_gguf_tokenizer, source_gguf, write_hf_tokenizer
from ghosted.checkpoint.meta import CheckpointMeta, is_ghost_class
from ghosted.errors import GhostedError
from ghosted.io import discard_temp, new_temp_file, publish_file
from ghosted.json_io import index_shards, read_json
from ghosted.method import arch
from ghosted.method.arch import GgufArch

OUTTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class ExportResult:
    """What was written."""

    path: Path
    arch: str
    outtype: str
    num_layers: int
    tensors: int
    tokenizer: str  # where the tokenizer metadata came from
    bytes: int
    params: int = 0  # the elements of the tensors written (a tied head is not written: llama.cpp reuses token_embd)
    params_dense: int | None = None  # the dense base model's parameters (checkpoint.format.param_counts)
    untied_head: bool = False  # the fold untied the LM head from the embedding: one more vocab x hidden matrix

    @property
    def params_ratio(self) -> float | None:
        return self.params / self.params_dense if self.params_dense else None


# ---------------------------------------------------------------------------------------------------------
# Reading the checkpoint


def _read_config(ckpt: Path) -> dict:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise GhostedError(f"{ckpt} has no config.json: not a Hugging Face model folder")
    return read_json(cfg_path, "model config", expect=dict)


def _weight_files(ckpt: Path, variant: str | None = None) -> list[Path]:
    stem = f"model.{variant}" if variant else "model"
    index = ckpt / (f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json")
    if index.is_file():
        return [ckpt / n for n in index_shards(index)]
    single = ckpt / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise GhostedError(f"{ckpt} has no {stem}.safetensors (or index): export needs safetensors weights")


def _tensor_names(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.extend(sf.keys())
    return names


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def check_plain(ckpt: Path, cfg: dict, names: list[str]) -> None:
    """Refuse a checkpoint that needs ghost code to run: exporting it would silently drop the ghosts."""
    ghosts = CheckpointMeta.from_dict(cfg.get("ghosted") or {}).ghost_list
    ghost_tensors = [n for n in names if n.startswith("ghosts.") or ".ghosts." in n]
    archs = cfg.get("architectures") or []
    custom = cfg.get("model_type") == MODEL_TYPE or any(is_ghost_class(a) for a in archs)
    if ghosts or ghost_tensors or custom:
        what = f"{len(ghosts)} ghost operator(s)" if ghosts else (
            f"{len(ghost_tensors)} ghost tensor(s)" if ghost_tensors else f"architecture {archs[0] if archs else 'ghosted'}")
        raise GhostedError(
            f"{ckpt} is a ghost checkpoint ({what}): llama.cpp cannot run ghost operators and would drop them; "
            "prune with `--recovery foldable` (or scalar, replaceme, none) for a plain checkpoint that exports"
        )


def gguf_form(meta: dict) -> tuple[str | None, str]:
    """What `ghosted export --gguf` writes for a checkpoint with this `ghosted` block: (llama.cpp architecture, "")
    or (None, why it cannot). Reads only the metadata (the registry records it per version)."""
    m = CheckpointMeta.from_dict(meta or {})
    base = m.base_architecture or None
    spec = arch.gguf_spec(base)
    if spec is None:
        return None, f"architecture {base} has no GGUF export"
    if not m.ghost_list:
        return spec.gguf_arch, ""
    try:
        gguf_deci.layout({"num_hidden_layers": m.num_layers, "num_attention_heads": 1, "intermediate_size": 1},
                         m.ghost_list, base, spec.gguf_arch)
    except (GhostedError, TypeError, ValueError, KeyError) as exc:
        return None, str(exc)
    return "deci", ""


# ---------------------------------------------------------------------------------------------------------
# Tensor layout


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved rotary pairs, per head; [n_head*hd, ...] -> same shape."""
    hd = w.shape[0] // n_head
    # Row j < hd/2 of a head pairs with row j + hd/2 in HF; llama.cpp wants the pair adjacent: (j, j + hd/2).
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _to_gguf_array(t: torch.Tensor, outtype: str):
    """(array, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors stay float32, as llama.cpp's converter does."""
    import gguf

    t = t.detach().to(torch.float32).contiguous()
    if t.ndim <= 1 or outtype == "f32":
        return t.numpy(), None
    if outtype == "f16":
        return t.to(torch.float16).numpy(), None
    # numpy has no bfloat16: hand over the raw bytes and their GGML type.
    raw = t.to(torch.bfloat16).view(torch.uint16).numpy().view(np.uint8)
    return raw, gguf.GGMLQuantizationType.BF16


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    if "full_attention" in rp:  # per-layer-type rope (Gemma 3 in transformers 5)
        rp = rp["full_attention"]
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise GhostedError("config.json has no rope_theta")
    return float(theta)


def _rope_scaling(cfg: dict) -> dict:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rp:
        rp = rp["full_attention"]
    return rp


def _write_hparams(writer, cfg: dict, spec: GgufArch, name: str, outtype: str,
                   deci: gguf_deci.DeciLayout | None = None) -> None:
    import gguf

    n_layer = int(cfg["num_hidden_layers"]) if deci is None else len(deci.blocks)
    hidden = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype])
    writer.add_block_count(n_layer)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    if deci is None:
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
    else:  # per-layer arrays: a ghost layer has heads but no KV heads, and a small zero feed-forward block
        writer.add_feed_forward_length(deci.ff_lengths())
        writer.add_head_count(deci.head_counts())
        writer.add_head_count_kv(deci.kv_head_counts())
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    if spec.gguf_arch == "llama":  # deci too (a Llama-family graph)
        writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head or spec.gguf_arch == "gemma3" or deci is not None:  # deci: a layer may have 0
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rs = _rope_scaling(cfg)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    elif kind not in ("default", None):
        raise GhostedError(f"rope scaling '{kind}' is not supported by the exporter (default and linear are)")
    if spec.sliding_window:
        window = cfg.get("sliding_window")
        types = cfg.get("layer_types") or []
        if window and types:
            writer.add_sliding_window(int(window))
            # Per-layer list: pruning breaks Gemma 3's every-sixth-layer-global pattern, llama.cpp reads the list.
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
            local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta",
                                                                                         cfg.get("rope_local_base_freq"))
            if local is not None:
                writer.add_rope_freq_base_swa(float(local))
        scalar = cfg.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) != head_dim:
            raise GhostedError(f"query_pre_attn_scalar {scalar} != head_dim {head_dim}: llama.cpp's gemma3 assumes them equal")
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


# ---------------------------------------------------------------------------------------------------------
# The export


def _checkpoint_dir(ckpt: str | Path) -> Path:
    """The folder to export; a ghosted checkpoint is verified before any of its files is read (a dense folder or a
    shipped model is no checkpoint and has nothing to verify)."""
    from ghosted.checkpoint.verify import checked_model
    from ghosted.models import resolve

    ref = resolve(str(ckpt))
    if ref.kind == "gguf":
        raise GhostedError(f"{ckpt} is already a GGUF file")
    if ref.kind == "hub":
        raise GhostedError(f"{ckpt}: export reads a local checkpoint folder; download it first")
    checked_model(ref.path)
    return Path(ref.path)


@dataclass
class _Source:
    """What the export reads from a checkpoint folder, checked before anything is written."""

    folder: Path
    cfg: dict
    spec: GgufArch
    deci: gguf_deci.DeciLayout | None
    files: list[Path]
    tied: bool
    layer_prefix: str

    @property
    def out_arch(self) -> str:
        return self.spec.gguf_arch if self.deci is None else "deci"

    @property
    def n_layer(self) -> int:
        return int(self.cfg["num_hidden_layers"]) if self.deci is None else len(self.deci.blocks)


def _read_source(ckpt: str | Path) -> _Source:
    """The checkpoint's config, family and weights; a ghost without a llama.cpp form is refused here."""
    folder = _checkpoint_dir(ckpt)
    cfg = _read_config(folder)
    meta = CheckpointMeta.from_dict(cfg.get("ghosted") or {})
    ghosts = meta.ghost_list
    if ghosts:
        arch_name = meta.base_architecture
    else:
        check_plain(folder, cfg, [])  # a ghost checkpoint is refused by its config before its weights are looked for
        archs = cfg.get("architectures") or []
        arch_name = archs[0] if archs else None
    spec = arch.gguf_spec(arch_name)  # the family's "gguf" entry in the arch table (ghosted/_data/architectures)
    if spec is None:
        supported = ", ".join(arch.gguf_architectures())
        raise GhostedError(f"architecture {arch_name} has no GGUF export yet; supported: {supported}")
    deci = gguf_deci.layout(cfg, ghosts, arch_name, spec.gguf_arch) if ghosts else None
    files = _weight_files(folder, VARIANT if ghosts else None)
    names = _tensor_names(files)
    if deci is None:
        check_plain(folder, cfg, names)
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in names
    return _Source(folder, cfg, spec, deci, files, tied, f"{meta.layers_path or 'model.layers'}.")


def _add_tensors(writer, src: _Source, outtype: str) -> tuple[int, int]:
    """Every tensor of the checkpoint under its llama.cpp name (kept layers renumbered around the ghost layers),
    then the ghost and detector layers; (tensors, elements)."""
    import gguf

    cfg, spec, deci = src.cfg, src.spec, src.deci
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == src.out_arch)
    name_map = gguf.get_tensor_name_map(gguf_arch, src.n_layer)
    renumber = deci.block_of_kept if deci is not None else {i: i for i in range(int(cfg["num_hidden_layers"]))}
    prefix = src.layer_prefix
    count, blocks, elements = 0, set(), 0
    ghost_parts: dict[int, dict[str, torch.Tensor]] = {}

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal count, elements
        arr, raw = _to_gguf_array(t, outtype)
        writer.add_tensor(name, arr, raw_dtype=raw)
        count += 1
        elements += t.numel()

    for hf_name, t in _iter_tensors(src.files):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every reader
        if hf_name == "lm_head.weight" and src.tied:
            continue  # llama.cpp reuses token_embd when `output` is absent
        if deci is not None and hf_name.startswith("ghosts."):
            _, site, part = hf_name.split(".", 2)
            ghost_parts.setdefault(int(site), {})[part] = t
            continue
        if hf_name.startswith(prefix):  # kept layer i -> its block in the output (ghost layers between)
            idx, rest = hf_name[len(prefix):].split(".", 1)
            hf_name = f"{prefix}{renumber[int(idx)]}.{rest}"
        base, _, suffix = hf_name.rpartition(".")
        gname = name_map.get_name(base)
        if gname is None:
            raise GhostedError(f"tensor {hf_name} has no llama.cpp name for {spec.gguf_arch}: cannot export it")
        if spec.permute_qk and gname.endswith(".attn_q"):
            t = permute_qk(t, n_head)
        elif spec.permute_qk and gname.endswith(".attn_k"):
            t = permute_qk(t, n_kv)
        if spec.norm_offset and "norm" in gname.rsplit(".", 1)[-1]:
            t = t.to(torch.float32) + spec.norm_offset
        if gname.startswith("blk."):
            blocks.add(int(gname.split(".")[1]))
        add(f"{gname}.{suffix}", t)
    for j, (kind, site) in enumerate(deci.blocks if deci is not None else ()):
        if kind == "kept":
            continue
        make = gguf_deci.ghost_tensors if kind == "ghost" else gguf_deci.detector_tensors
        for suffix, t in make(site, ghost_parts.get(site, {}), int(cfg["hidden_size"])).items():
            add(f"blk.{j}.{suffix}", t)
        blocks.add(j)
    if blocks != set(range(src.n_layer)):
        raise GhostedError(f"config says {src.n_layer} layers but the weights hold blocks {sorted(blocks)}")
    return count, elements


def export_gguf(ckpt: str | Path, out: str | Path, outtype: str = "f16") -> ExportResult:
    """Write checkpoint `ckpt` (a plain or exportable ghost checkpoint folder, or a shipped name) as GGUF file
    `out`, atomically."""
    import gguf

    if outtype not in OUTTYPES:
        raise GhostedError(f"unknown --outtype '{outtype}': use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise GhostedError(f"output file must end in .gguf, got {out}")
    if out.is_dir():
        raise GhostedError(f"{out} is a folder: give a file name ending in .gguf")
    src = _read_source(ckpt)
    folder, cfg = src.folder, src.cfg

    tmp = new_temp_file(out)  # in a marked temp folder: a killed export's is removed by the next writer there
    try:
        writer = gguf.GGUFWriter(str(tmp), src.out_arch)
        label = (cfg.get("ghosted") or {}).get("base_model") or folder.name
        _write_hparams(writer, cfg, src.spec, f"{folder.name} ({label})" if label != folder.name else label, outtype,
                       src.deci)
        source = source_gguf(folder, cfg)
        if source is not None:
            check_vocab(folder, source, int(cfg["vocab_size"]))
            copy_gguf_tokenizer(writer, source)
            tok_desc = f"copied from {source.name}"
        else:
            tok_desc = write_hf_tokenizer(writer, folder)
        count, elements = _add_tensors(writer, src, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish_file(tmp, out)
    finally:
        discard_temp(tmp)
    folded = (cfg.get("ghosted") or {}).get("folded") or []
    return ExportResult(out, src.out_arch, outtype, src.n_layer, count, tok_desc, out.stat().st_size, elements,
                        param_counts(folder)["params_dense"], any("head untied" in str(f) for f in folded))
