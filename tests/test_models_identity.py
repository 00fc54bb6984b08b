"""A base model's identity (ghosted.models.fingerprint / identity, the `fingerprint` stage): a shipped model is its
GGUF's sha256 and converts into a folder keyed by it; a hub model is hub:<commit> offline as online."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ghosted import models
from ghosted.cli import main
from ghosted.errors import GhostedError
from ghosted.hashing import file_sha256
from ghosted.io_temps import MARKER
from ghosted.mlops.dvc import write_base_model
from tests.checkpoint.test_export import make_tiny_folder
from tests.tiny_models import save_tiny_folder

NAME, PACKAGE = "tiny-shipped", "tiny_shipped_pkg"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> tuple[Path, Path]:
    """Two releases of one tiny Llama as GGUF: f32, then f16 (other bytes, both load as fp32)."""
    root = tmp_path_factory.mktemp("ggufs")
    folder = make_tiny_folder(root / "tiny-llama", "llama", num_layers=2)
    out = []
    for outtype in ("f32", "f16"):
        path = root / f"tiny-{outtype}.gguf"
        assert main(["export", str(folder), "--gguf", str(path), "--outtype", outtype]) == 0
        out.append(path)
    return out[0], out[1]


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """A fake shipped model: a package folder holding tiny.gguf (the test seam: SHIPPED and _package_dir)."""
    pkg = tmp_path / "site-packages" / PACKAGE
    pkg.mkdir(parents=True)
    monkeypatch.setenv("GHOSTED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.SHIPPED, NAME, {"package": PACKAGE, "pip": "tiny-shipped==0", "gguf": "tiny.gguf",
                                               "assemble": ""})
    real = models._package_dir
    monkeypatch.setattr(models, "_package_dir", lambda package: pkg if package == PACKAGE else real(package))
    return pkg


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}


def test_a_new_release_of_a_shipped_model_converts_again_and_changes_the_fingerprint(ggufs, shipped, tmp_path):
    old, new = ggufs
    shutil.copy(old, shipped / "tiny.gguf")
    sha = file_sha256(old)
    record = tmp_path / "data" / "base_model.json"
    assert write_base_model(NAME, record)["fingerprint"] == "sha256:" + sha
    assert not (models.cache_dir() / "models").exists()  # the fingerprint stage converts nothing
    first = record.read_bytes()
    write_base_model(NAME, record)
    assert record.read_bytes() == first  # unchanged model: identical bytes, nothing reruns

    ref = models.resolve(NAME)
    folder = Path(ref.path)
    assert folder == models.cache_dir() / "models" / f"{NAME}-{sha[:12]}" and (folder / "config.json").is_file()
    assert models.fingerprint(ref) == models.identity(NAME) == "sha256:" + sha
    before = _hashes(folder)

    shutil.copy(new, shipped / "tiny.gguf")  # the package's new release: same name, other bytes
    sha2 = file_sha256(new)
    assert sha2 != sha
    write_base_model(NAME, record)
    assert record.read_bytes() != first and json.loads(record.read_text())["fingerprint"] == "sha256:" + sha2
    ref2 = models.resolve(NAME)
    folder2 = Path(ref2.path)
    assert folder2 == models.cache_dir() / "models" / f"{NAME}-{sha2[:12]}" != folder
    assert models.fingerprint(ref2) == "sha256:" + sha2
    assert json.loads((folder2 / "ghosted_source.json").read_text())["sha256"] == sha2
    assert _hashes(folder2)["model.safetensors"] != before["model.safetensors"]  # f16 weights: new conversion
    assert _hashes(folder) == before  # the old conversion is left as it was, and no longer used
    assert models.resolve(NAME).path == str(folder2)  # converted once


def test_an_unkeyed_conversion_of_the_same_bytes_is_adopted_and_one_of_other_bytes_is_not(ggufs, shipped):
    """An older ghosted converted into models/<name>: reused (hard links) when it holds these GGUF bytes."""
    old, new = ggufs
    shutil.copy(old, shipped / "tiny.gguf")
    keyed = Path(models.resolve(NAME).path)
    unkeyed = models.cache_dir() / "models" / NAME
    keyed.rename(unkeyed)  # what an older ghosted left
    before = _hashes(unkeyed)
    assert models.resolve(NAME).path == str(keyed)
    assert (keyed / "model.safetensors").stat().st_ino == (unkeyed / "model.safetensors").stat().st_ino
    assert _hashes(unkeyed) == before and (keyed / MARKER).is_file()

    shutil.copy(new, shipped / "tiny.gguf")  # the unkeyed folder is of other bytes now: a fresh conversion
    fresh = Path(models.resolve(NAME).path)
    assert fresh != keyed and (fresh / "model.safetensors").stat().st_ino != (unkeyed / "model.safetensors").stat().st_ino
    assert json.loads((fresh / "ghosted_source.json").read_text())["sha256"] == file_sha256(new)


def test_a_split_shipped_gguf_is_identified_by_its_joined_bytes(ggufs, tmp_path, monkeypatch):
    """gemma3-270m's kind: the package lists part files (chunk_paths) and joins them (assemble)."""
    src = ggufs[0].read_bytes()
    root = tmp_path / "site"
    pkg = root / "tiny_split_pkg"
    (pkg / "data").mkdir(parents=True)
    half = len(src) // 2
    (pkg / "data" / "p0").write_bytes(src[:half])
    (pkg / "data" / "p1").write_bytes(src[half:])
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def chunk_paths():\n    return [Path(__file__).parent / 'data' / n for n in ('p0', 'p1')]\n"
        "def assemble(output_path, overwrite=False):\n"
        "    Path(output_path).write_bytes(b''.join(p.read_bytes() for p in chunk_paths()))\n"
        "    return Path(output_path)\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("GHOSTED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.SHIPPED, "tiny-split", {"package": "tiny_split_pkg", "pip": "tiny-split==0",
                                                       "gguf": "tiny.gguf", "assemble": "yes"})
    try:
        sha = file_sha256(ggufs[0])
        assert models.identity("tiny-split") == "sha256:" + sha
        joined = models.shipped_gguf("tiny-split")
        assert joined == models.cache_dir() / "gguf" / sha[:12] / "tiny.gguf" and file_sha256(joined) == sha
        assert models.shipped_folder("tiny-split") == models.cache_dir() / "models" / f"tiny-split-{sha[:12]}"
    finally:
        sys.modules.pop("tiny_split_pkg", None)


def test_a_missing_shipped_package_or_file_is_one_line(shipped, monkeypatch):
    with pytest.raises(GhostedError, match="tiny.gguf is missing"):  # the package is there, its GGUF is not
        models.identity(NAME)
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(GhostedError, match="needs the package tiny-shipped==0") as exc:
        models.identity(NAME)
    assert "\n" not in str(exc.value)


def _hub_snapshot(hub: Path, repo: str, commit: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/} (files saved in place)."""
    root = hub / ("models--" + repo.replace("/", "--"))
    snap = save_tiny_folder(root / "snapshots" / commit, num_layers=2)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def _fingerprint_offline(hub: Path, repo: str, out: Path) -> str:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ghosted", "fingerprint", repo, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())["fingerprint"]


def test_a_hub_model_is_its_commit_offline_as_online(tmp_path):
    from huggingface_hub import scan_cache_dir

    hub, repo = tmp_path / "hub", "ghosted-test/tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _hub_snapshot(hub, repo, commit)
    # The snapshot's folder names the commit the hub resolved main to when it was downloaded (what
    # HfApi().model_info(repo).sha reports online): huggingface_hub reads the same commit off the folder.
    assert models.snapshot_commit(snap) == commit
    revisions = [r for info in scan_cache_dir(hub).repos if info.repo_id == repo for r in info.revisions]
    assert [r.commit_hash for r in revisions] == [commit]

    out = tmp_path / "base_model.json"
    assert _fingerprint_offline(hub, repo, out) == "hub:" + commit
    first = out.read_bytes()
    assert _fingerprint_offline(hub, repo, out) == "hub:" + commit and out.read_bytes() == first

    newer = "fedcba9876543210fedcba9876543210fedcba98"  # a new revision downloaded: main moves
    _hub_snapshot(hub, repo, newer)
    assert _fingerprint_offline(hub, repo, out) == "hub:" + newer


def test_a_folder_that_is_not_a_snapshot_names_no_commit(tmp_path):
    with pytest.raises(GhostedError, match="not a hub cache snapshot"):
        models.snapshot_commit(tmp_path / "snapshots" / "not-a-commit")
    with pytest.raises(GhostedError, match="not a hub cache snapshot"):
        models.snapshot_commit(tmp_path / "0123456789abcdef0123456789abcdef01234567")
