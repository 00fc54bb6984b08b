"""ghosted heal on tiny random checkpoints: the same kind out as in, verified and loadable, no LoRA left, the held-out
guard, and the one-line refusals (evaluation text, bad settings)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ghosted
from ghosted.config.heal import HealConfig
from ghosted.errors import GhostedError
from ghosted.evaluation.perplexity import mean_nll
from ghosted.healing.lora import Adapter, merge
from ghosted.healing.train import adjacent_layers

WORDS = ("cat dog sun sea hill road tree lake river stone cloud field house bird fish wind rain snow light "
         "night day green blue red small large old new quick slow warm cold").split()


def _text(seed: int, docs: int = 40, words: int = 40) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(docs))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heal-text")
    out = {}
    for name, seed in (("calib", 0), ("heal", 1), ("eval", 2)):
        out[name] = root / f"{name}.txt"
        out[name].write_text(_text(seed))
    out["leak"] = root / "leak.txt"  # the evaluation text under another name (its documents shuffled by the seed)
    out["leak"].write_text(out["eval"].read_text())
    out["one"] = root / "one.txt"  # one document: its first window is the evaluation text's first window too
    out["one"].write_text(_text(3, docs=1, words=600))
    out["one-eval"] = root / "one-eval.txt"
    out["one-eval"].write_text(out["one"].read_text())
    return out


def _recipe(texts: dict[str, Path], **kw) -> HealConfig:
    base = dict(source=str(texts["heal"]), eval_sources=str(texts["eval"]), n=12, seq_len=32, batch_size=2,
                steps=30, lr=3e-3, eval_every=5, patience=4, holdout=0.25, lora_rank=4, max_minutes=None)
    return HealConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def checkpoints(tiny_folder, texts, tmp_path_factory) -> dict[str, Path]:
    """A plain checkpoint (plain removal) and an exportable ghost one, both of layers 2-3 of the tiny Llama."""
    root = tmp_path_factory.mktemp("heal-ckpt")
    out = {}
    for kind, prune in (("plain", "recovery: none"), ("ghost", "recovery: ghost\n  exportable: true")):
        p = root / f"{kind}.yaml"
        p.write_text(f"calibration:\n  source: {texts['calib']}\n  n: 8\n  seq_len: 32\n"
                     f"prune:\n  layers: 2-3\n  {prune}\n")
        out[kind] = ghosted.prune(str(tiny_folder), ghosted.load_params(p), root / kind, progress=False).out
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _heldout_ids(folder: Path) -> torch.Tensor:
    """The held-out healing windows a checkpoint's lineage names, rebuilt from its recorded data."""
    from ghosted.checkpoint.format import load_tokenizer
    from ghosted.corpora import build_calibration

    data = json.loads((folder / "config.json").read_text())["ghosted"]["heal"]["data"]
    calib = build_calibration(load_tokenizer(folder), data["source"], data["windows"], data["seq_len"], data["seed"])
    assert calib.sha256 == data["sha256"]
    return calib.input_ids[-data["heldout_windows"]:]


@pytest.mark.parametrize("kind", ["plain", "ghost"])
def test_heal_gives_the_same_kind_verified_loadable_and_better_on_heldout(kind, checkpoints, texts, tmp_path):
    src, out = checkpoints[kind], tmp_path / "healed"
    res = ghosted.heal(src, _recipe(texts), out, progress=False)
    assert res.healed and res.heldout_nll_after < res.heldout_nll_before and res.reason is None
    ghosted.verify(str(out))
    block = json.loads((out / "config.json").read_text())["ghosted"]
    before = json.loads((src / "config.json").read_text())["ghosted"]
    assert block["healed"] is True and bool(block.get("ghosts")) == (kind == "ghost")
    assert block["ghosts"] == before["ghosts"] if kind == "ghost" else "ghosts" not in block or not block["ghosts"]
    rec = block["heal"]
    assert rec["recipe"]["lr"] == 3e-3 and rec["tokens"]["train"] == rec["steps_run"] * 2 * 32
    assert rec["plan"]["adjacent"] == [1, 2] and rec["plan"]["lora"] == [0, 3]
    assert rec["seconds"]["total"] > 0 and rec["curve"] and rec["data"]["eval_overlap"][str(texts["eval"])]
    # nothing of LoRA: the same tensor names and shapes as the input, and only the planned layers changed
    old, new = _weights(src), _weights(out)
    assert {k: v.shape for k, v in old.items()} == {k: v.shape for k, v in new.items()}
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert any(".layers.1." in k for k in changed) and any(".layers.0.self_attn.q_proj" in k for k in changed)
    assert not any("norm" in k and ".layers.0." in k for k in changed)  # LoRA touches linears only
    assert "model.embed_tokens.weight" not in changed
    if kind == "ghost":  # an exportable ghost: its weight stays the identity, so llama.cpp's deci layer holds it
        w = new["ghosts.2.weight"]
        assert torch.equal(w, torch.eye(w.shape[0])) and "ghosts.2.norm_weight" in changed
    model = ghosted.load(str(out))
    held = _heldout_ids(out)
    assert abs(mean_nll(model, held, 2) - res.heldout_nll_after) < 1e-5
    if kind == "plain":  # a plain checkpoint stays one plain transformers loads
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(plain(held).logits, model(held).logits, atol=1e-5)


def _unchanged(src: Path, out: Path, reason: str) -> None:
    ghosted.verify(str(out))
    old, new = _weights(src), _weights(out)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    block = json.loads((out / "config.json").read_text())["ghosted"]
    assert block["healed"] is False and block["heal"]["reason"] == reason


def test_guard_writes_the_checkpoint_unchanged_when_no_evaluation_beats_it(checkpoints, texts, tmp_path, monkeypatch):
    """The training runs (and moves the weights); the guard then finds no held-out evaluation below the start."""
    from ghosted.healing import train

    real = train.kd_train

    def never_better(*args, **kwargs):
        run = real(*args, **kwargs)
        run.best, run.best_state = run.before, None
        return run

    monkeypatch.setattr(train, "kd_train", never_better)
    src, out = checkpoints["ghost"], tmp_path / "guarded"
    res = ghosted.heal(src, _recipe(texts, steps=10), out, progress=False)
    assert not res.healed and "no held-out evaluation beat" in res.reason
    assert res.heldout_nll_after == res.heldout_nll_before
    _unchanged(src, out, res.reason)


def test_guard_rejects_merged_weights_that_are_not_better(checkpoints, texts, tmp_path, monkeypatch):
    from ghosted.healing import run

    monkeypatch.setattr(run, "_heldout", lambda *a: float("inf"))
    src, out = checkpoints["plain"], tmp_path / "guarded"
    res = ghosted.heal(src, _recipe(texts, steps=10), out, progress=False)
    assert not res.healed and "after merging is not below" in res.reason
    _unchanged(src, out, res.reason)


def test_evaluation_text_is_refused_in_one_line(checkpoints, texts, tmp_path, run):
    same = _recipe(texts, source=str(texts["one"]), eval_sources=str(texts["one-eval"]))
    with pytest.raises(GhostedError, match="healing window 0 equals window 0 of the evaluation text"):
        ghosted.heal(checkpoints["plain"], same, tmp_path / "a", progress=False)
    with pytest.raises(GhostedError, match=r"repeats the evaluation text .* \(1 of its 1 31-token spans\)"):
        ghosted.heal(checkpoints["plain"], _recipe(texts, source=str(texts["leak"])), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_an_evaluation_source_by_name_is_refused_in_one_line(checkpoints, tmp_path, run):
    code, _, err = run("heal", checkpoints["plain"], "--out", tmp_path / "b", "--source", "passages+wiki", "-q")
    assert code == 2 and err.count("\n") == 1 and "'wiki', an evaluation text" in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "0"], "--lora-rank must be a whole number >= 1"),
    (["--lora-rank", "17"], "17 is above the smaller side of layer 0.self_attn.k_proj (32 x 16)"),
    (["--train", "lora,everything"], "unknown part 'everything'"),
    (["--holdout", "1"], "--holdout (heal.holdout) must be in (0, 1)"),
    (["--seq-len", "5000"], "--seq-len (heal.seq_len) 5000 is longer than the model's 1024 positions"),
    (["--device", "cuda:7"], "--device"),
    (["--base", "/nonexistent/model"], "cannot be read"),
])
def test_bad_settings_are_refused_in_one_line(argv, message, checkpoints, texts, tmp_path, run):
    code, _, err = run("heal", checkpoints["plain"], "--out", tmp_path / "x", "--source", texts["heal"],
                       "--eval-sources", texts["eval"], *argv, "-q")
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_base_with_another_fingerprint_is_refused(checkpoints, texts, tmp_path, run):
    other = tmp_path / "other"
    other.mkdir()
    for f in Path(json.loads((checkpoints["plain"] / "config.json").read_text())["ghosted"]["base_model"]).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    code, _, err = run("heal", checkpoints["plain"], "--out", tmp_path / "x", "--base", other, "-q")
    assert code == 2 and "was pruned from" in err


def test_adjacent_layers_and_merge_are_exact():
    # dense 10 layers, cuts 2-3 and 7: kept 0,1,4,5,6,8,9 -> pruned 0..6; next to the cuts: 1,2 and 4,5
    assert adjacent_layers([2, 3, 7], 7) == [1, 2, 4, 5]
    assert adjacent_layers([0, 1], 4) == [0]  # a cut at the start has no layer before it
    assert adjacent_layers([6, 7], 6) == [5]  # a cut at the end has none after it
    lin = torch.nn.Linear(6, 5)
    ad = Adapter(6, 5, 2, torch.Generator().manual_seed(0))
    torch.nn.init.normal_(ad.B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        hooked = lin(x) + ad(x)
        merge(lin, ad)
        assert torch.allclose(lin(x), hooked, atol=1e-6)


def test_the_command_reads_the_recipe_from_config_and_flags_override_it(checkpoints, texts, tmp_path, run):
    params = tmp_path / "params.yaml"
    params.write_text(f"heal:\n  source: {texts['heal']}\n  eval_sources: {texts['eval']}\n  n: 12\n  seq_len: 32\n"
                      "  steps: 50\n  lr: 0.003\n  eval_every: 5\n  lora_rank: 4\n  train: adjacent\n")
    code, out, err = run("heal", checkpoints["ghost"], "--out", tmp_path / "h", "--config", params, "--steps", 5, "-q")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    rec = json.loads((tmp_path / "h" / "config.json").read_text())["ghosted"]["heal"]
    assert summary["steps"] == rec["steps_run"] == 5 and rec["recipe"]["lr"] == 0.003
    assert rec["plan"] == {"adjacent": [1, 2], "lora": [], "lora_rank": 4, "ghosts": False}
    assert rec["trained_params"]["lora"] == 0 and summary["healed"] == (rec["heldout_nll_after"] < rec["heldout_nll_before"])


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text", "qwen3", "phi3"])
def test_adapters_merge_into_every_family_exactly(family):
    """Hooked adapters (B made non-zero) and the merged weights give the same logits; no hook is left behind."""
    from ghosted.healing import lora
    from ghosted.healing.train import _linears, plan_heal
    from ghosted.method.operator import Operator
    from ghosted.method.surgery import HookOwner, apply
    from tests.tiny_models import make_tiny

    model, _ = make_tiny(family, num_layers=4)
    apply(model, [1], {(1, 2): Operator("identity")})
    plan = plan_heal(model, [1], HealConfig(lora_rank=4))
    assert plan.adjacent == [0, 1] and plan.lora == [2]
    linears = _linears(model, plan.lora)
    assert linears
    adapters = lora.make_adapters(linears, 4, seed=0)
    for ad in adapters.values():
        torch.nn.init.normal_(ad.B, std=0.1)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hooks = HookOwner()
    hooks.own([lora.hook(lin, adapters[lora.key(n)]) for n, lin in linears.items()])
    with torch.no_grad():
        hooked = model(ids).logits
        hooks.remove()
        plain_logits = model(ids).logits
        for n, lin in linears.items():
            lora.merge(lin, adapters[lora.key(n)])
        merged = model(ids).logits
    assert not torch.allclose(hooked, plain_logits, atol=1e-4)
    assert torch.allclose(merged, hooked, atol=1e-4)


def _oracle_teacher(src, data, cfg, progress, log):
    """A teacher that knows the text: all its mass on the true next token (distillation becomes plain language
    modelling, which lowers the held-out loss of a tiny random model where a random teacher would not)."""
    ids = data.calib.input_ids[data.fit]
    t_idx = torch.arange(cfg.top_k).expand(*ids[:, 1:].shape, cfg.top_k).clone()
    t_idx[..., 0] = ids[:, 1:]
    t_logp = torch.full(t_idx.shape, -30.0)
    t_logp[..., 0] = 0.0
    return (t_logp, t_idx), 0.0


@pytest.mark.parametrize("recovery", [["--recovery", "none"], ["--recovery", "ghost", "--exportable", "--guard", "off"]])
def test_healed_checkpoints_still_export_to_gguf(recovery, texts, tmp_path, run, monkeypatch):
    """A healed plain checkpoint exports as its base architecture, a healed exportable ghost as llama.cpp's deci."""
    import gguf

    from ghosted.healing import run as heal_run
    from tests.checkpoint.test_export import make_tiny_folder

    base = make_tiny_folder(tmp_path / "base", "llama")  # a byte-level tokenizer: one GGUF can hold
    code, _, err = run("prune", base, "--layers", "2-3", *recovery, "--calib-source", texts["calib"], "--n-seqs", 8,
                       "--seq-len", 32, "--out", tmp_path / "pruned", "-q")
    assert code == 0, err
    monkeypatch.setattr(heal_run, "_teacher", _oracle_teacher)
    res = ghosted.heal(tmp_path / "pruned", _recipe(texts), tmp_path / "healed", progress=False)
    assert res.healed
    code, _, err = run("export", tmp_path / "healed", "--gguf", tmp_path / "healed.gguf")
    assert code == 0, err
    arch = gguf.GGUFReader(str(tmp_path / "healed.gguf")).fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == ("deci" if "--exportable" in recovery else "llama")


def test_if_enabled_writes_the_checkpoint_unchanged_when_the_recipe_is_off(checkpoints, texts, tmp_path, run):
    """The pipeline's stage: `--if-enabled` with heal.enabled false copies the checkpoint through, unhealed."""
    params = tmp_path / "params.yaml"
    params.write_text(f"heal:\n  enabled: false\n  source: {texts['heal']}\n  eval_sources: {texts['eval']}\n")
    code, out, err = run("heal", checkpoints["plain"], "--out", tmp_path / "h", "--config", params, "--if-enabled", "-q")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["healed"] is False and summary["steps"] == 0 and "heal.enabled is false" in summary["reason"]
    _unchanged(checkpoints["plain"], tmp_path / "h", summary["reason"])


def test_topk_kl_with_the_tail_is_the_kl_over_k_plus_one_outcomes():
    from ghosted.solve.distill import topk_kl

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    t_logp, t_idx = teacher.log_softmax(-1).topk(6, dim=-1)
    assert abs(float(topk_kl(teacher, t_logp, t_idx, tail=True))) < 1e-6
    p, q = teacher.softmax(-1), student.softmax(-1)

    def coarse(x):  # the top-6 tokens' probabilities and the rest's
        top = x.gather(-1, t_idx)
        return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)

    exact = (coarse(p) * (coarse(p).log() - coarse(q).log())).sum(-1).mean()
    assert torch.allclose(topk_kl(student, t_logp, t_idx, tail=True), exact, atol=1e-5)
    # without the tail, a student with all its mass on the teacher's top k scores better than the teacher itself
    greedy = torch.full_like(teacher, -30.0).scatter(-1, t_idx, t_logp)
    assert float(topk_kl(greedy, t_logp, t_idx)) < 0 < float(topk_kl(greedy, t_logp, t_idx, tail=True))
