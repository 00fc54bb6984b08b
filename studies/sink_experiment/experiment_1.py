"""Sink experiment 1 (SmolLM2, 32x512 passages calibration, 8 eval windows): none vs ghost fitted on all tokens,
with position 0 left out, and with sink tokens fitted to their true targets at weight w. Output: (wiki PPL, PTB PPL).

    python -m studies.sink_experiment.experiment_1     (writes reports/sink_experiment/sink_experiment_1.txt)
"""

from __future__ import annotations

import math

from studies.common import printed_to, text_report_parser


def run() -> None:
    from ghosted.calibration.capture import CapturePlan, capture
    from ghosted.corpora import build_calibration, load_documents, make_windows
    from ghosted.evaluation.perplexity import mean_nll
    from ghosted.method.linalg import PairSums, solve_ghost
    from ghosted.method.surgery import temporarily_pruned
    from ghosted.models import load_model

    L = load_model('smollm2-135m')
    c = build_calibration(L.tokenizer, n=32, seq_len=512)
    wiki = make_windows(L.tokenizer, load_documents('wiki'), 512)[:8]
    ptb = make_windows(L.tokenizer, load_documents('ptb'), 512)[:8]
    cuts = [(13, 19), (10, 19)]
    ra = capture(L.model, c.input_ids, CapturePlan(pairs=cuts), 'all', progress=False)
    rs = capture(L.model, c.input_ids, CapturePlan(pairs=cuts), 'sink', progress=False)

    def ev(removed, ops):
        with temporarily_pruned(L.model, removed, ops) as m:
            return math.exp(mean_nll(m, wiki)), math.exp(mean_nll(m, ptb))

    for cut in cuts:
        removed = list(range(*cut))
        A, S = ra.fit[cut], rs.fit[cut]
        sink = PairSums(A.d, A.n - S.n)
        sink.gram = A.gram - S.gram
        sink.cross = A.cross - S.cross
        print(cut, 'none', ev(removed, {}), flush=True)
        for name, sums in [('all', A), ('sink-excluded', S)]:
            print(cut, name, ev(removed, {cut: solve_ghost(sums, 1e-6)}), flush=True)
        for w in [1e2, 1e4]:
            s2 = PairSums(A.d, S.n)
            s2.gram = S.gram + w * sink.gram
            s2.cross = S.cross + w * sink.cross
            print(cut, f'sink-constrained w={w}', ev(removed, {cut: solve_ghost(s2, 1e-6)}), flush=True)


def main() -> None:
    a = text_report_parser(__doc__, "sink_experiment.experiment_1", "sink_experiment_1.txt").parse_args()
    with printed_to(a.out):
        run()


if __name__ == "__main__":
    main()
