"""The model card every checkpoint carries, files no loader reads (accepted), files a loader reads (refused),
upgrade keeping a user's files, and a tokenizer that loads without remote code."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

import ghosted
from ghosted.checkpoint.format import MANIFEST, load_tokenizer, param_counts, write_manifest
from ghosted.checkpoint.upgrade import upgrade
from ghosted.checkpoint.verify import verify
from ghosted.cli import main
from ghosted.errors import GhostedError
from ghosted.hashing import file_sha256
from tests.checkpoint.test_checkpoint import _as_legacy, _copy, _ghost_checkpoint


@pytest.fixture(scope="module")
def ghost_ck(tmp_path_factory) -> Path:
    return _ghost_checkpoint("llama", tmp_path_factory.mktemp("card") / "llama-ghost")[0]


def test_every_checkpoint_carries_a_model_card_listed_in_its_manifest(ghost_ck) -> None:
    card = (ghost_ck / "README.md").read_text()
    manifest = json.loads((ghost_ck / MANIFEST).read_text())["files"]
    assert manifest["README.md"] == file_sha256(ghost_ck / "README.md")
    meta = json.loads((ghost_ck / "config.json").read_text())["ghosted"]
    assert meta["base_architecture"] in card and "1-2 (2 of 4; 2 left)" in card
    assert "`ghost`" in card and "ghosted.load(" in card and "trust_remote_code=True" in card
    assert "ghosted verify" in card and card.startswith("---\nlibrary_name: transformers")
    counts = param_counts(ghost_ck)
    assert f"{counts['params']:,}" in card and f"{counts['params_dense']:,}" in card


def _add_hub_files(ck: Path) -> None:
    (ck / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (ck / "LICENSE").write_text("Apache-2.0\n")
    (ck / "images").mkdir()
    (ck / "images" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (ck / "README.md").write_text((ck / "README.md").read_text() + "\nMy notes on this model.\n")


def test_files_no_loader_reads_are_accepted(ghost_ck, tmp_path: Path, capsys) -> None:
    ck = _copy(ghost_ck, tmp_path / "hub")
    _add_hub_files(ck)
    summary = verify(ck)
    assert summary["unchecked_files"] == [".gitattributes", "LICENSE", "README.md", "images/loss.png"]
    assert ghosted.load(str(ck)).config.num_hidden_layers == 2
    assert main(["verify", str(ck)]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "ok"
    (ck / "README.md").unlink()  # a card may also be removed
    verify(ck)


@pytest.mark.parametrize("name,body", [
    ("model.safetensors", b"weights"),
    ("extra.py", b"import os\n"),
    ("model.safetensors.index.json", b'{"weight_map": {}}'),
    ("preprocessor_config.json", b"{}"),
    ("tokenizer.model", b"spm"),
])
def test_extra_files_a_loader_reads_are_refused(name: str, body: bytes, ghost_ck, tmp_path: Path, capsys) -> None:
    ck = _copy(ghost_ck, tmp_path / "bad")
    (ck / ".gitattributes").write_text("*.bin filter=lfs\n")
    (ck / name).write_bytes(body)
    with pytest.raises(GhostedError, match=rf"not in the manifest: {name.replace('.', '[.]')} "):
        ghosted.load(str(ck))
    assert main(["verify", str(ck)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ghosted: error: REFUSED: ") and len(err.strip().splitlines()) == 1


def test_upgrade_keeps_the_files_the_user_added(ghost_ck, tmp_path: Path, capsys) -> None:
    old = _as_legacy(_copy(ghost_ck, tmp_path / "old"))
    (old / "README.md").write_text("# my model card\n")
    (old / "NOTES.md").write_text("notes\n")
    assert main(["upgrade", str(old)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["upgraded"] is True and result["kept_files"] == ["NOTES.md", "README.md"]
    assert (old / "README.md").read_text() == "# my model card\n" and (old / "NOTES.md").is_file()
    assert verify(old)["unchecked_files"] == []  # kept files are listed in the new manifest


def test_upgrade_rewrites_the_card_it_wrote_and_keeps_the_users(ghost_ck, tmp_path: Path) -> None:
    """An intact checkpoint of another version's ghost code: the card its manifest lists is ghosted's (rewritten),
    a file the user added is kept."""
    old = _copy(ghost_ck, tmp_path / "old")
    (old / "README.md").write_text("# written by an older ghosted\n")
    (old / "modeling_ghosted.py").write_text((old / "modeling_ghosted.py").read_text() + "\n# older ghosted\n")
    write_manifest(old)
    (old / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert upgrade(old)["kept_files"] == [".gitattributes"]
    assert "ghosted.load(" in (old / "README.md").read_text() and (old / ".gitattributes").is_file()
    assert verify(old)["unchecked_files"] == []


def test_ghost_tokenizer_loads_without_remote_code(ghost_ck, monkeypatch) -> None:
    """transformers asks "run the custom code? [y/N]" (input()) for a ghost config; ghosted's loaders never do."""
    from ghosted.checkpoint.digest import checkpoint_sha256
    from ghosted.mlops.serving import ARTIFACT, SHA_KEY, GhostedTextGenerator

    def no_prompt(*_a):
        raise AssertionError("prompted to run the folder's code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    tok = load_tokenizer(ghost_ck)
    assert tok("hello world")["input_ids"]

    class Context:
        artifacts = {ARTIFACT: str(ghost_ck)}  # noqa: RUF012
        model_config = {SHA_KEY: checkpoint_sha256(ghost_ck)}  # noqa: RUF012 - what `register` records with the model

    gen = GhostedTextGenerator()
    gen.load_context(Context())
    assert gen.tokenizer.padding_side == "left" and gen.model.config.num_hidden_layers == 2
