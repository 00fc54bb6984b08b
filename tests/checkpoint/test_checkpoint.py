"""Checkpoint identity and integrity: every loader runs the ghost or refuses; tampered folders are refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, pipeline

import ghosted
from ghosted.checkpoint import format as checkpoint
from ghosted.checkpoint.verify import verify
from ghosted.cli import main
from ghosted.corpora import Calibration, tokens_sha256
from ghosted.errors import GhostedError
from ghosted.method.surgery import temporarily_pruned
from ghosted.models import load_model
from ghosted.solve.solver import PruneConfig, build_checkpoint, solve
from tests.solve.test_prune import _calib, _ids, _loaded, _logits

WEIGHTS = "model.ghosted.safetensors"


def _ghost_checkpoint(family: str, out: Path, **cfg) -> tuple[Path, torch.Tensor, torch.Tensor, str]:
    """A ghost checkpoint of a tiny model; returns (folder, probe ids, logits of the hooked model, base class)."""
    loaded = _loaded(family)
    calib = _calib(loaded.model)
    opts = {"layers": "1-2", "guard": "off", "holdout": 0.0, "token_policy": "sink", **cfg}
    sol = solve(loaded, calib, PruneConfig(**opts), progress=False, log=lambda m: None)
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=1)
    with temporarily_pruned(loaded.model, sol.removed, sol.operators) as m:
        hooked = _logits(m, ids)
    base = type(loaded.model).__name__
    build_checkpoint(loaded, sol, calib.sha256, out)
    return out, ids, hooked, base


@pytest.fixture(scope="module")
def llama_ck(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor, str]:
    return _ghost_checkpoint("llama", tmp_path_factory.mktemp("ck") / "llama-ghost")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- A. every loader runs the ghost or refuses


def _loaders(base: str) -> dict[str, Callable[[Path], torch.nn.Module]]:
    """Every way we know to turn the folder into a model; each must run the ghost or raise."""
    base_cls = getattr(transformers, base)

    def gen_pipeline(trust: bool | None) -> Callable[[Path], torch.nn.Module]:
        kw = {} if trust is None else {"trust_remote_code": trust}
        return lambda d: pipeline("text-generation", model=str(d), **kw).model

    return {
        "ghosted.load": lambda d: ghosted.load(str(d)),
        "ghosted.models.load_model": lambda d: load_model(str(d)).model,
        "AutoModelForCausalLM": lambda d: AutoModelForCausalLM.from_pretrained(d),
        "AutoModelForCausalLM(trust_remote_code=False)": lambda d: AutoModelForCausalLM.from_pretrained(
            d, trust_remote_code=False),
        "AutoModelForCausalLM(trust_remote_code=True)": lambda d: AutoModelForCausalLM.from_pretrained(
            d, trust_remote_code=True),
        "AutoModel": lambda d: AutoModel.from_pretrained(d),
        "AutoConfig": lambda d: AutoConfig.from_pretrained(d),
        f"{base}.from_pretrained": lambda d: base_cls.from_pretrained(d),
        f"AutoModelForCausalLM(config={base_cls.config_class.__name__})":
            lambda d: AutoModelForCausalLM.from_pretrained(d, config=base_cls.config_class.from_pretrained(d)),
        "pipeline(text-generation)": gen_pipeline(None),
        "pipeline(text-generation, trust_remote_code=True)": gen_pipeline(True),
    }


RUNS = {"ghosted.load", "ghosted.models.load_model", "AutoModelForCausalLM(trust_remote_code=True)",
        "pipeline(text-generation, trust_remote_code=True)"}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "qwen3"])
def test_every_loader_runs_the_ghost_or_refuses(family: str, tmp_path: Path) -> None:
    """0 silent loads: a loader either gives ghosted.load's logits or raises."""
    ck, ids, hooked, base = _ghost_checkpoint(family, tmp_path / f"{family}-ghost")
    reference = _logits(ghosted.load(str(ck)), ids)
    assert torch.allclose(reference, hooked, atol=1e-5)
    outcomes = {}
    for name, loader in _loaders(base).items():
        try:
            model = loader(ck)
        except Exception as exc:  # noqa: BLE001 - refusing is one of the two allowed outcomes
            outcomes[name] = f"refused: {type(exc).__name__}: {' '.join(str(exc).split())}"
            continue
        if isinstance(model, transformers.PretrainedConfig):
            pytest.fail(f"{name} read the config without running the folder's code: {model.model_type}")
        torch.testing.assert_close(_logits(model.eval(), ids), reference, atol=1e-6, rtol=0,
                                   msg=lambda m, n=name: f"{n} loaded the checkpoint but not its ghost: {m}")
        outcomes[name] = "runs the ghost"
    assert {n for n, o in outcomes.items() if o == "runs the ghost"} == RUNS, outcomes
    refused = {n: o for n, o in outcomes.items() if n not in RUNS}
    assert "trust_remote_code" in refused["AutoModelForCausalLM"], refused
    assert "model.safetensors" in refused[f"{base}.from_pretrained"], refused


def test_config_names_its_own_type(llama_ck) -> None:
    ck, *_ = llama_ck
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["model_type"] == "ghosted" and cfg["architectures"] == ["GhostedForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_ghosted.GhostedConfig",
                               "AutoModelForCausalLM": "modeling_ghosted.GhostedForCausalLM"}
    assert (ck / WEIGHTS).is_file() and not (ck / "model.safetensors").exists()
    assert verify(ck)["kind"] == "ghost"


def test_remote_model_saved_again_stays_ghosted(llama_ck, tmp_path: Path) -> None:
    """save_pretrained of a trust_remote_code model keeps the variant name: the base class still refuses it."""
    ck, ids, _, base = llama_ck
    remote = AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True).eval()
    remote.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS).is_file()
    with pytest.raises(OSError, match="model.safetensors"):
        getattr(transformers, base).from_pretrained(tmp_path / "again")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    assert torch.equal(_logits(back, ids), _logits(remote, ids))


@pytest.mark.parametrize("recovery", ["none", "scalar", "replaceme"])
def test_plain_checkpoints_stay_plain(recovery: str, tmp_path: Path) -> None:
    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1-2", guard="off", holdout=0.0, recovery=recovery),
                progress=False, log=lambda m: None)
    ids = _ids(loaded.model.config.vocab_size, 2, 12, seed=1)
    build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    assert not list((tmp_path / "ck").glob("*.py")) and (tmp_path / "ck" / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert torch.equal(_logits(plain, ids), _logits(ghosted.load(str(tmp_path / "ck")), ids))
    assert verify(tmp_path / "ck")["kind"] == "plain"


def test_guard_rejected_ghost_is_a_plain_checkpoint(tmp_path: Path) -> None:
    """A ghost the guard turned down ships no recovery: a plain base-architecture folder. (Few tokens, d > tokens,
    ridge 0: the ghost interpolates noise and loses to plain removal on the held-out windows, as in test_prune.)"""
    loaded = _loaded("llama")
    ids = _ids(loaded.model.config.vocab_size, 8, 6)
    calib = Calibration(ids, "random", 0, tokens_sha256(ids))
    sol = solve(loaded, calib, PruneConfig(layers="1-2", guard="loss", holdout=0.5, ridge=0.0),
                progress=False, log=lambda m: None)
    assert sol.meta.guard.fallback is True
    meta = build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta.ghosts == [] and cfg["ghosted"]["guard"]["fallback"] is True
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    assert not list((tmp_path / "ck").glob("*.py"))
    probe = _ids(loaded.model.config.vocab_size, 2, 12, seed=1)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval(), probe),
                       _logits(loaded.model, probe))


def _as_legacy(ck: Path) -> Path:
    """Rewrite a checkpoint the way ghosted 0.1 wrote it: base model type and class, auto_map to the modeling
    file only, weights in model.safetensors, no manifest, no configuration file."""
    cfg = json.loads((ck / "config.json").read_text())
    base = cfg["ghosted"]["base_architecture"]
    cfg.update(model_type="llama", architectures=[base],
               auto_map={"AutoModelForCausalLM": f"modeling_ghosted.Ghosted{base}"})
    cfg["ghosted"].pop("format")
    (ck / "config.json").write_text(json.dumps(cfg))
    (ck / WEIGHTS).rename(ck / "model.safetensors")
    for name in ("ghosted_manifest.json", "configuration_ghosted.py", ".ghosted-output"):
        (ck / name).unlink()
    return ck


def test_legacy_checkpoint_refused_then_upgraded(llama_ck, tmp_path: Path, capsys) -> None:
    ck, ids, hooked, base = llama_ck
    old = _as_legacy(_copy(ck, tmp_path / "old"))
    with pytest.raises(GhostedError, match=r"ghosted upgrade .*old"):
        ghosted.load(str(old))
    with pytest.raises(GhostedError, match="ghosted upgrade"):
        load_model(str(old))  # what `ghosted eval` and `ghosted bench` load through
    assert main(["verify", str(old)]) == 2
    assert "ghosted upgrade" in capsys.readouterr().err
    assert main(["upgrade", str(old)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["upgraded"] is True
    assert torch.allclose(_logits(ghosted.load(str(old)), ids), hooked, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(old)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


# --------------------------------------------------------------------------- B. integrity: tampered folders are refused


def _rehash(ck: Path) -> None:
    """Rewrite the manifest after a tamper, so the structural checks (not the hashes) must catch it."""
    checkpoint.write_manifest(ck)


def _edit_config(ck: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    fn(cfg)
    (ck / "config.json").write_text(json.dumps(cfg, indent=2))


def _edit_tensors(ck: Path, fn: Callable[[dict], None]) -> None:
    tensors = load_file(str(ck / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(ck / WEIGHTS), metadata={"format": "pt"})


def _flip_weight_byte(ck: Path) -> None:
    data = bytearray((ck / WEIGHTS).read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data, past the header
    (ck / WEIGHTS).write_bytes(bytes(data))


def _nan_in_ghost(t: dict) -> None:
    t["ghosts.1.weight"][0, 0] = float("nan")


TAMPERS: dict[str, tuple[Callable[[Path], None], bool, str]] = {
    # name: (tamper, rewrite the manifest afterwards, expected reason)
    "edited weight bytes": (_flip_weight_byte, False, "modified after it was written"),
    "num_hidden_layers mismatch": (lambda ck: _edit_config(ck, lambda c: c.update(num_hidden_layers=3)), True,
                                   "layers"),
    "layer count of config and block both wrong": (
        lambda ck: _edit_config(ck, lambda c: (c.update(num_hidden_layers=3), c["ghosted"].update(num_layers=3))),
        True, "the weights hold layers"),
    "num_hidden_layers mismatch, hashes stale": (
        lambda ck: _edit_config(ck, lambda c: c.update(num_hidden_layers=3)), False, "config.json was modified"),
    "ghost site out of range": (
        lambda ck: _edit_config(ck, lambda c: c["ghosted"]["ghosts"][0].update(site=9)), True, "out of range"),
    "ghost site negative": (
        lambda ck: _edit_config(ck, lambda c: c["ghosted"]["ghosts"][0].update(site=-1)), True, "out of range"),
    "missing ghost tensor": (lambda ck: _edit_tensors(ck, lambda t: t.pop("ghosts.1.weight")), True,
                             "ghosts.1.weight is missing"),
    "ghost tensor of the wrong shape": (
        lambda ck: _edit_tensors(ck, lambda t: t.update({"ghosts.1.weight": t["ghosts.1.weight"][:, :4].clone()})),
        True, "shape"),
    "NaN in a ghost tensor": (lambda ck: _edit_tensors(ck, _nan_in_ghost), True, "non-finite"),
    "NaN in a ghost tensor, hashes stale": (lambda ck: _edit_tensors(ck, _nan_in_ghost), False, "modified"),
    "modified modeling file": (
        lambda ck: (ck / "modeling_ghosted.py").write_text((ck / "modeling_ghosted.py").read_text() + "\nimport os\n"),
        False, "modeling_ghosted.py was modified"),
    "modified modeling file, manifest rewritten": (
        lambda ck: (ck / "modeling_ghosted.py").write_text((ck / "modeling_ghosted.py").read_text() + "\nimport os\n"),
        True, "not the code this ghosted writes"),
    "auto_map to another file": (
        lambda ck: (_edit_config(ck, lambda c: c["auto_map"].update(AutoModelForCausalLM="evil.GhostedForCausalLM")),
                    (ck / "evil.py").write_text("import os\n")), True, "auto_map"),
    "extra code file": (lambda ck: (ck / "evil.py").write_text("import os\n"), False, "not in the manifest"),
    "tokenizer auto_map": (
        lambda ck: (ck / "tokenizer_config.json").write_text(json.dumps(
            {**json.loads((ck / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["x.T", None]}})),
        True, "auto_map"),
    "missing manifest": (lambda ck: (ck / "ghosted_manifest.json").unlink(), False, "no ghosted_manifest.json"),
    "missing weights": (lambda ck: (ck / WEIGHTS).unlink(), False, "missing"),
    "config.json not JSON": (lambda ck: (ck / "config.json").write_text("{"), False, "not valid JSON"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_checkpoint_is_refused(name: str, llama_ck, tmp_path: Path, capsys) -> None:
    ck, *_ = llama_ck
    tamper, rehash, reason = TAMPERS[name]
    bad = _copy(ck, tmp_path / "bad")
    tamper(bad)
    if rehash:
        _rehash(bad)
    with pytest.raises(GhostedError, match=reason):
        ghosted.load(str(bad))
    assert main(["verify", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("ghosted: error: REFUSED: ") and len(err.strip().splitlines()) == 1, err


def test_verify_accepts_an_intact_checkpoint(llama_ck, capsys) -> None:
    ck, *_ = llama_ck
    assert main(["verify", str(ck)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "ok" and verdict["ghosts"] == 1 and verdict["num_layers"] == 2


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    loaded = _loaded("llama")
    calib = _calib(loaded.model)
    sol = solve(loaded, calib, PruneConfig(layers="1", guard="off", holdout=0.0), progress=False, log=lambda m: None)
    next(iter(sol.operators.values())).W[0, 0] = float("nan")
    with pytest.raises(GhostedError, match="non-finite"):
        build_checkpoint(loaded, sol, calib.sha256, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_upgrade_rewrites_the_code_of_an_intact_checkpoint_from_another_version(llama_ck, tmp_path: Path,
                                                                                 capsys) -> None:
    """A checkpoint written before the ghost code changed: its files match its manifest, its code is not this
    version's. verify and load say to upgrade; upgrade rewrites it (same logits); an edited code file whose
    manifest was not rewritten stays refused."""
    ck, ids, hooked, _ = llama_ck
    old = _copy(ck, tmp_path / "old")
    modeling = old / "modeling_ghosted.py"
    modeling.write_text(modeling.read_text() + "\n# written by an older ghosted\n")
    checkpoint.write_manifest(old)  # as that version wrote it: intact
    with pytest.raises(GhostedError, match="ghosted upgrade"):
        verify(old)
    tampered = _copy(old, tmp_path / "tampered")
    (tampered / "modeling_ghosted.py").write_text(modeling.read_text() + "import os\n")
    assert main(["upgrade", str(old)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["upgraded"] is True
    assert verify(old)["ghosts"] == 1
    assert torch.allclose(_logits(ghosted.load(str(old)), ids), hooked, atol=1e-5)
    assert main(["upgrade", str(tampered)]) == 2
    assert "modified after it was written" in capsys.readouterr().err


def test_upgrade_never_reblesses_a_tampered_checkpoint(llama_ck, tmp_path: Path, capsys) -> None:
    ck, *_ = llama_ck
    bad = _copy(ck, tmp_path / "bad")
    _flip_weight_byte(bad)
    assert main(["upgrade", str(bad)]) == 2
    assert "modified after it was written" in capsys.readouterr().err
    with pytest.raises(GhostedError):
        verify(bad)
