"""What the pipeline's budget measures for pretraining, per precision, in one run.

    python benchmarks/budget_precision.py [--config configs/fashion_mnist_demo.yaml] [--precisions fp32,bf16]

For each precision, the budget's own timer (``budget._StepTimer``) times the pretraining stage's
step (``engine.pretrain.build_parts`` and ``train_step`` at learning rate 0, under the autocast of
that precision) on the config's data and batch, and gives its estimate for one pretraining epoch
(steps, image loading and the kNN monitor), the number from which the budget sizes pretraining.
On a CPU without native bf16 the bf16 step is the slower one; on a GPU or a CPU with AMX it is the
faster. Compare the rows with each other only: the machine's load moves both.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import torch


def main(argv: list[str]) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist_demo.yaml")
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    from simclrv2 import budget
    from simclrv2 import config as C
    from simclrv2.host import cpu_name
    from simclrv2.plan import PipelineConfig, plan_stages

    print(f"{args.config}; {cpu_name()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| precision | batch | steps an epoch | seconds a step | images/s | one epoch (estimate) | measured in |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    with tempfile.TemporaryDirectory() as run_dir:
        base = C.build(PipelineConfig, C.load_yaml(args.config))
        sizes = None
        for precision in args.precisions:
            pc = dataclasses.replace(base, budget_minutes=0.0, run_dir=run_dir,
                                     pretrain=dict(base.pretrain, epochs=1, precision=precision))
            cfg = plan_stages(pc)[0].cfg
            sizes = sizes or budget._Sizes(cfg)  # the data opened once: both rows read the same images
            timer = budget._StepTimer(sizes, budget.CPU)
            batch = min(cfg.batch_size, sizes.pool)
            t0 = time.perf_counter()
            step = timer.pretrain_step(cfg, batch)
            epoch = timer.pretrain_epoch(cfg)
            rows[precision] = (step, epoch)
            print(f"| {precision} | {batch} | {max(1, sizes.pool // batch)} | {step:.3f} | {batch / step:.0f} | "
                  f"{epoch:.1f} s | {time.perf_counter() - t0:.0f} s |", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
