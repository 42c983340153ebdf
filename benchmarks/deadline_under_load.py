"""The pipeline under ``budget_minutes`` on a machine that slows down after the budget measured it
(or, with ``--while-measuring``, one that is slow only while the budget measures it).

Runs ``simclrv2 pipeline`` with the demo's config on an image folder and, a while after
pretraining starts (so after the budget's measurement), starts a process that keeps one core busy
part of the time, until the pipeline ends. With ``--while-measuring`` that process runs from the
start until pretraining starts instead: the budget then measures a slower machine than the one
that trains. Then prints what the budget planned and what ran::

    python benchmarks/deadline_under_load.py DATA_DIR RUN_DIR [--budget-minutes 5] [--busy 0.6]
        [--after 30 | --while-measuring] [--src OTHER_CHECKOUT/src] [override ...]

``--src`` runs another checkout's package (an older commit, for a comparison); extra arguments are
pipeline overrides. docs/EXPERIMENTS.md ("A machine that slows down during pretraining") has runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def busy(fraction: float) -> None:
    """Keep one core busy ``fraction`` of each tenth of a second, forever."""
    while True:
        t = time.time()
        while time.time() - t < 0.1 * fraction:
            pass
        time.sleep(0.1 * (1 - fraction))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir")
    ap.add_argument("run_dir")
    ap.add_argument("--budget-minutes", type=float, default=5.0)
    ap.add_argument("--busy", type=float, default=0.6, help="share of the time the load keeps a core busy")
    ap.add_argument("--after", type=float, default=30.0, help="seconds after pretraining starts")
    ap.add_argument("--while-measuring", action="store_true",
                    help="the load runs from the start until pretraining starts, not after")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the package's source folder to run")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "simclrv2", "pipeline", "--config", str(ROOT / "configs" / "fashion_mnist_demo.yaml"),
           "common.dataset=imagefolder", f"common.data_dir={args.data_dir}", "common.image_size=28",
           "label_fractions=[1.0]", f"run_dir={args.run_dir}", "common.progress=false",
           f"budget_minutes={args.budget_minutes:g}", *args.overrides]
    env = dict(os.environ, PYTHONPATH=args.src)
    load = mp.Process(target=busy, args=(args.busy,), daemon=True)
    timer = threading.Timer(args.after, load.start)
    if args.while_measuring:
        load.start()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
        for line in run.stdout:
            print(line, end="", flush=True)
            if "(pretrain) ..." not in line:
                continue
            if args.while_measuring:
                load.terminate()  # the load ends as pretraining starts
            else:
                timer.start()  # the load starts --after seconds into pretraining
        rc = run.wait()
    timer.cancel()
    if load.is_alive():
        load.terminate()
    if rc != 0:
        return rc
    out = json.loads((Path(args.run_dir) / "results.json").read_text())
    stages, plan, pre = out["stages"], out["budget"], out["pretrain"]
    later = sum(stages.values()) - stages["pretrain"]
    # the later stages' share of their configured steps: as planned, then (where pretraining ended
    # ahead of its estimate) as planned again
    share = f"{plan.get('other_scale', 1.0):.0%}" + (f" then {plan['regrown_scale']:.0%}" if "regrown_scale" in plan else "")
    print("\n| Budget | Planned epochs (s each) | Pretraining epochs run | Pretraining s | Later stages' steps "
          "| Later stages s (estimate) | Pipeline s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.budget_minutes * 60:.0f} s | {plan['epochs']:g} ({plan['epoch_seconds']:.2f}) | {pre['epochs']:g} | "
          f"{stages['pretrain']:.0f} | {share} | {later:.0f} ({plan['other_seconds']:.0f}) | {out['total_seconds']:.0f} |")
    if load.pid is None:
        print("(the pipeline ended before the load started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
