"""Code the studies share: where their reports go, the model and calibration they start from, a ridge fit and the
input states of chosen layers. Studies are run from the repository root as modules (`python -m studies.<study>`).

Importing this module imports neither torch nor ghosted (memory_profile measures the resident memory of the
runtime before they load); the functions that need them import them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


def report_dir(study: str) -> Path:
    """reports/<study>/: the one folder a study writes."""
    return ROOT / "reports" / study


def layer_inputs(model, layers: list[torch.nn.Module], ids: torch.Tensor) -> list[torch.Tensor]:
    """The input state of each of `layers` (modules, so a pruned model works too) for every window, float32
    [n, T, d] each, one window per forward."""
    import torch

    seen: list[list[torch.Tensor]] = [[] for _ in layers]

    def grab(i):
        def hook(_m, args, kwargs):
            seen[i].append((args[0] if args else kwargs["hidden_states"]).detach()[0])
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for w in range(ids.shape[0]):
                model(ids[w:w + 1])
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(states) for states in seen]


def fit(Z: torch.Tensor, Y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares in float64, the ridge relative to the mean diagonal of Z^T Z."""
    import torch

    G = Z.T @ Z
    G.diagonal().add_(ridge * float(G.diagonal().mean()))
    return torch.linalg.solve(G, Z.T @ Y).float()


def study_parser(doc: str, example: str, study: str) -> argparse.ArgumentParser:
    """The arguments the operator and downstream studies share: the model, the blocks, the calibration and the
    output (default reports/<study>/<study>_<model>.json)."""
    ap = argparse.ArgumentParser(prog=f"python -m studies.{study}", description=doc.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--layers", action="append", required=True, help=f"a block, e.g. {example} (repeatable)")
    ap.add_argument("--calib-source", default="passages+ptb-train")
    ap.add_argument("--n-seqs", type=int, default=64)
    ap.add_argument("--out", type=Path, help=f"the JSON report (default reports/{study}/{study}_MODEL.json)")
    return ap


def load_for_study(a) -> tuple:
    """The model and the calibration windows every study script starts from (seed 0, 512-token windows)."""
    import torch

    from ghosted.corpora import build_calibration
    from ghosted.models import load_model

    torch.manual_seed(0)
    loaded = load_model(a.model)
    return loaded, build_calibration(loaded.tokenizer, a.calib_source, a.n_seqs, 512, 0)


def write_report(a, blocks: list[dict], t0: float, study: str) -> None:
    out_path = a.out or report_dir(study) / f"{study}_{Path(a.model).name}.json"
    out = {"model": a.model, "calibration": {"source": a.calib_source, "n": a.n_seqs, "seq_len": 512},
           "blocks": blocks, "seconds": time.perf_counter() - t0,
           "command": f"python -m studies.{study} " + " ".join(sys.argv[1:])}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {out_path} in {out['seconds']:.0f} s")


def solve_spd(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A Z = B for symmetric positive (semi)definite A in float64, robust to near-singularity (a copy of the
    solver ghosted.method.linalg uses, so a study does not import a private name)."""
    import torch

    A = (A + A.T) / 2
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    return torch.linalg.lstsq(A, B).solution


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def printed_to(path: Path):
    """Everything printed inside the block goes to the console and to `path` (the study's text report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f, contextlib.redirect_stdout(_Tee(sys.stdout, f)):
        yield
    print(f"wrote {path}")


def text_report_parser(doc: str, study: str, default_name: str) -> argparse.ArgumentParser:
    """--out only (default reports/<study>/<default_name>): for the studies whose report is their printed output."""
    ap = argparse.ArgumentParser(prog=f"python -m studies.{study}", description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=report_dir(study.split(".")[0]) / default_name,
                    help=f"the text report (default reports/{study.split('.')[0]}/{default_name})")
    return ap
