"""Sink experiment 2: position 0 left out + identity on position 0 at inference; sinks anchored to identity
(target = own state) at weight w; position 0 left out with larger ridges. Output: (wiki PPL, PTB PPL).

    python -m studies.sink_experiment.experiment_2     (writes reports/sink_experiment/sink_experiment_2.txt)
"""

from __future__ import annotations

import math

from studies.common import printed_to, solve_spd, text_report_parser


def run() -> None:
    import torch

    from ghosted.calibration.capture import CapturePlan, capture
    from ghosted.corpora import build_calibration, load_documents, make_windows
    from ghosted.evaluation.perplexity import mean_nll
    from ghosted.method import arch
    from ghosted.method.linalg import F64, Operator, ridge_lambda, solve_ghost
    from ghosted.method.surgery import temporarily_pruned
    from ghosted.models import load_model

    L = load_model('smollm2-135m')
    c = build_calibration(L.tokenizer, n=32, seq_len=512)
    wiki = make_windows(L.tokenizer, load_documents('wiki'), 512)[:8]
    ptb = make_windows(L.tokenizer, load_documents('ptb'), 512)[:8]
    cuts = [(13, 19), (10, 19)]
    ra = capture(L.model, c.input_ids, CapturePlan(pairs=cuts), 'all', progress=False)
    rs = capture(L.model, c.input_ids, CapturePlan(pairs=cuts), 'sink', progress=False)

    def ev(removed, ops, gate0=False):
        with temporarily_pruned(L.model, removed, ops) as m:
            hs = []
            if gate0:
                site = arch.get_layers(m)[removed[0]]
                # runs after the ghost hook (registered later): put position 0 back to its pre-ghost value
                g = m.ghosts[str(removed[0])]

                def hook(mod, args, kwargs):
                    h = args[0] if args else kwargs['hidden_states']
                    W = g.weight.to(h.dtype)
                    # undo: recover x0 by solving x0 W = h0 (W invertible)
                    x0 = torch.linalg.solve(W.T.double(), h[:, 0].double().T).T.to(h.dtype)
                    h = h.clone()
                    h[:, 0] = x0
                    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, 'hidden_states': h})
                hs.append(site.register_forward_pre_hook(hook, with_kwargs=True))
            try:
                return round(math.exp(mean_nll(m, wiki)), 2), round(math.exp(mean_nll(m, ptb)), 2)
            finally:
                for h in hs:
                    h.remove()

    for cut in cuts:
        removed = list(range(*cut))
        A, S = ra.fit[cut], rs.fit[cut]
        print(cut, 'sink-excluded + identity on pos0', ev(removed, {cut: solve_ghost(S, 1e-6)}, gate0=True),
              flush=True)
        Gs = A.gram - S.gram
        for w in [1.0, 100.0]:
            lam = ridge_lambda(S.gram, 1e-6)
            M = solve_spd(S.gram + w * Gs + lam * torch.eye(S.d, dtype=F64), S.cross - S.gram)
            print(cut, f'sink->identity w={w}', ev(removed, {cut: Operator('full', W=torch.eye(S.d, dtype=F64) + M)}),
                  flush=True)
        for r in [1e-3, 1e-2, 1e-1]:
            print(cut, f'sink-excluded ridge {r}', ev(removed, {cut: solve_ghost(S, r)}), flush=True)


def main() -> None:
    a = text_report_parser(__doc__, "sink_experiment.experiment_2", "sink_experiment_2.txt").parse_args()
    with printed_to(a.out):
        run()


if __name__ == "__main__":
    main()
