"""Where the CPU memory of `ghosted bench` goes (SmolLM2-135M, 8 x 512 calibration, 7 layers, angular):
resident memory after each step and the high-water mark, printed (no report file). Output of this session:
runtime 243 MiB; after load 433 (weights are memory-mapped, paged in on first use); after the dense forward
1145 (all weights resident + ~320 MiB the allocator keeps from the forward, high-water 1528 with logits);
prune+fit high-water 1565, i.e. 420 MiB of its own (31 hidden states of a 4 x 512 batch for the score
tables, 146 MiB, and the float64 sums of 24 candidate blocks, ~130 MiB); model 513 MiB.

    python -m studies.bench_memory_breakdown
"""

from __future__ import annotations

import argparse


def main() -> None:
    argparse.ArgumentParser(prog="python -m studies.bench_memory_breakdown",
                            description=__doc__.split("\n\n")[0]).parse_args()
    from ghosted.evaluation import bench
    from ghosted.evaluation.harness import proc_bytes, reset_cpu_peak
    from ghosted.solve.solver import PruneConfig, solve

    def rss() -> float:
        return proc_bytes("VmRSS") / 2**20

    def hwm() -> float:
        return proc_bytes("VmHWM") / 2**20

    r0 = rss()
    print("runtime", r0)
    L = bench.load_bench_model("smollm2-135m", "float32", "cpu")
    print("after load rss", rss(), "hwm", hwm())
    c = bench.bench_calibration(L, 8, 512)
    print("after calib", rss())
    bench.forward_seconds(L.model, c.input_ids, 4)
    print("after forward rss", rss(), "hwm", hwm())
    reset_cpu_peak()
    print("after reset hwm", hwm())
    cfg = PruneConfig(remove=7, select="angular", recovery="ghost", guard="off", holdout=0.0, token_policy="sink",
                      batch_size=4)
    solve(L, c, cfg, progress=False, log=lambda m: None)
    print("after solve rss", rss(), "hwm", hwm())
    print("model MiB", sum(p.numel() * p.element_size() for p in L.model.parameters()) / 2**20)


if __name__ == "__main__":
    main()
