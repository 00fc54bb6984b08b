"""Sink experiment 3 (SmolLM2, 32x512 passages calibration, 8 eval windows of wiki and PTB): where the
position-0 attention sink forms, and what map the first token should get when the ghost is fitted on the
other tokens (ridge 1e-3). "route: X" maps position 0 by X and every other token by the sink-excluded ghost.
Output: (wiki PPL, PTB PPL).

    python -m studies.sink_experiment.experiment_3 [N]     (writes reports/sink_experiment/sink_experiment_3.txt)
"""

from __future__ import annotations

import math

from studies.common import printed_to, text_report_parser


def run(N: int) -> None:
    import torch

    from ghosted.calibration.capture import CapturePlan, capture
    from ghosted.corpora import build_calibration, load_documents, make_windows
    from ghosted.evaluation.perplexity import mean_nll
    from ghosted.method import arch
    from ghosted.method.linalg import solve_ghost
    from ghosted.method.surgery import temporarily_pruned
    from ghosted.models import load_model

    torch.manual_seed(0)
    L = load_model('smollm2-135m')
    c = build_calibration(L.tokenizer, n=N, seq_len=512)
    wiki = make_windows(L.tokenizer, load_documents('wiki'), 512)[:8]
    ptb = make_windows(L.tokenizer, load_documents('ptb'), 512)[:8]

    # norms of states at cut inputs/outputs, position 0 vs rest
    with torch.no_grad():
        hs = L.model(input_ids=c.input_ids[:4], output_hidden_states=True).hidden_states
    for i in (10, 13, 19):
        n = hs[i].norm(dim=-1)
        print(f'h{i}: pos0 norms {n[:,0].tolist()}, others max {n[:,1:].max():.1f} median {n[:,1:].median():.1f}; '
              f'top-5 others {n[:,1:].flatten().topk(5).values.tolist()}', flush=True)
    print('Y pos0 cos across windows', torch.nn.functional.cosine_similarity(hs[19][0, 0], hs[19][1, 0], dim=0).item())
    cuts = [(13, 19), (10, 19)]
    r = capture(L.model, c.input_ids, CapturePlan(pairs=cuts), 'auto', progress=False)

    class Routed(torch.nn.Module):
        def __init__(self, W, b, Ws, bs, tau):
            super().__init__()
            self.W, self.b, self.Ws, self.bs, self.tau = W, b, Ws, bs, tau

        def forward(self, h):
            out = h @ self.W.to(h.dtype)
            if self.b is not None:
                out = out + self.b.to(h.dtype)
            m = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
            if self.tau == 'pos0':
                m[:, 0] = True
            else:
                m = h.norm(dim=-1) > self.tau
            if m.any():
                hs_ = h[m]
                o = hs_ @ self.Ws.to(h.dtype) if self.Ws is not None else hs_.clone()
                if self.bs is not None:
                    o = o + self.bs.to(h.dtype)
                out[m] = o
            return out

    def ev(removed, ops):
        with temporarily_pruned(L.model, removed, {}) as m:
            hs_ = []
            for (s_, _b), mod in ops.items():
                def hook(_m, args, kwargs, mod=mod):
                    if args:
                        return (mod(args[0]), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs['hidden_states'] = mod(kwargs['hidden_states'])
                    return args, kwargs
                hs_.append(arch.get_layers(m)[s_].register_forward_pre_hook(hook, with_kwargs=True))
            try:
                return round(math.exp(mean_nll(m, wiki)), 2), round(math.exp(mean_nll(m, ptb)), 2)
            finally:
                for h in hs_:
                    h.remove()

    for cut in cuts:
        removed = list(range(*cut))
        kept = r.sums(cut, 'total', 'kept')
        left = r.fit_left_out[cut] + r.heldout_left_out[cut]
        print(cut, 'left-out tokens', left.n, 'kept', kept.n)
        mx, my = left.sum_x / left.n, left.sum_y / left.n
        tau = 'pos0'
        print('tau', tau)
        g = solve_ghost(kept, 1e-3)
        res = {}
        res['none'] = ev(removed, {})
        res['sink-excl'] = ev(removed, {cut: Routed(g.W.float(), None, g.W.float(), None, 1e30)})
        W, b = g.W.float(), None
        d = W.shape[0]
        eye = torch.eye(d)
        res['route: identity'] = ev(removed, {cut: Routed(W, b, eye, None, tau)})
        res['route: shift'] = ev(removed, {cut: Routed(W, b, eye, (my - mx).float(), tau)})
        res['route: const'] = ev(removed, {cut: Routed(W, b, torch.zeros_like(W), my.float(), tau)})
        for lam in (1e-1, 1.0):
            gs = solve_ghost(left, lam)
            res[f'route: sink ridge {lam}'] = ev(removed, {cut: Routed(W, b, gs.W.float(), None, tau)})
        for k, v in res.items():
            print(cut, k, v, flush=True)


def main() -> None:
    ap = text_report_parser(__doc__, "sink_experiment.experiment_3", "sink_experiment_3.txt")
    ap.add_argument("n", nargs="?", type=int, default=32, help="calibration windows (default 32)")
    a = ap.parse_args()
    with printed_to(a.out):
        run(a.n)


if __name__ == "__main__":
    main()
