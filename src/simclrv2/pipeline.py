"""``simclrv2 pipeline --config FILE``: every SimCLRv2 stage in one run folder, then a report.

Stages, each in its own sub-folder of ``run_dir``:

1. ``pretrain``;
2. ``finetune_<f>`` for each label fraction f (from head layer ``ft_proj_selector``);
3. ``distill_self_<f>`` and ``distill_small_<f>`` from each fine-tuned teacher;
4. ``linear_eval`` and ``knn`` of the pretrained encoder;
5. ``supervised_<f>``, the baselines on the same labelled subsets.

A finished stage leaves ``done.json`` with the hash of its resolved config and a fingerprint of
the stage it builds on (fine-tuning and the probes on pretraining, distillation on its teacher's
fine-tuning). A stage whose ``done.json`` matches both is skipped; an interrupted stage resumes
from its own last checkpoint. So an interrupted pipeline, run again, continues where it stopped.
A stage whose config was edited, or whose upstream stage has run again since, starts over (its
old checkpoints are kept as ``checkpoints.previous``), and so do the stages after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from . import distributed as dist
from . import runlock
from .checkpoint import atomic_write_text


@dataclass
class PipelineConfig:
    """The pipeline: which stages, and the keys each stage gets on top of its own defaults."""

    run_dir: str = "runs/pipeline"
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    self_distill: bool = True  # distil each teacher into its own architecture
    small_student: str = ""  # registry name of the big-to-small student; "" = skip
    common: dict = field(default_factory=dict)  # keys given to every stage (model, dataset, seed, ...)
    pretrain: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    supervised: dict = field(default_factory=dict)
    distill_self: dict = field(default_factory=dict)
    distill_small: dict = field(default_factory=dict)
    linear_eval: dict = field(default_factory=dict)
    knn_eval: dict = field(default_factory=dict)
    by_fraction: dict = field(default_factory=dict)  # {0.01: {finetune: {epochs: 60}, ...}}
    embedding_points: int = 2000  # test images in the 2-D embedding plot; 0 = no plot
    plots: bool = True


def fraction_tag(f: float) -> str:
    """0.01 -> '1pct', 0.001 -> '0.1pct' (folder names and report columns)."""
    return f"{f * 100:g}pct"


@dataclass
class StagePlan:
    name: str  # sub-folder and stages key
    stage: str  # CLI stage
    cfg: Any  # resolved stage config
    method: str | None  # results.json method, None for pretrain
    label_fraction: float | None
    upstream: str | None = None  # name of the stage whose output this one reads


# stages that evaluate the pretrained encoder; they share its features, and report its model
PROBE_STAGES = ("linear-eval", "knn-eval")


def _stage_cfg(stage: str, pc: PipelineConfig, run_dir: Path, name: str, *layers: dict) -> Any:
    values: dict[str, Any] = {}
    keys = {f.name for f in dataclasses.fields(C.STAGE_CONFIGS[stage])}
    for layer in (pc.common, *layers):
        values.update({k: v for k, v in layer.items() if k in keys or layer is not pc.common})
    values["run_dir"] = str(run_dir / name)
    cfg = C.build(C.STAGE_CONFIGS[stage], values, prefix=f"{name}.")
    C.validate(cfg)
    return cfg


def _fraction_layer(pc: PipelineConfig, f: float, section: str) -> dict:
    for key, val in pc.by_fraction.items():
        if abs(float(key) - f) < 1e-12:
            return dict(val.get(section, {}))
    return {}


def plan_stages(pc: PipelineConfig) -> list[StagePlan]:
    run_dir = Path(pc.run_dir)
    pre = _stage_cfg("pretrain", pc, run_dir, "pretrain", pc.pretrain)
    pre_dir = pre.run_dir
    plans = [StagePlan("pretrain", "pretrain", pre, None, None)]
    model = pre.model
    for f in pc.label_fractions:
        tag = fraction_tag(f)
        lab = {"label_fraction": f}
        ft = _stage_cfg("finetune", pc, run_dir, f"finetune_{tag}", pc.finetune,
                        _fraction_layer(pc, f, "finetune"), lab, {"init_checkpoint": pre_dir, "model": model})
        ft_name = f"finetune_{tag}"
        plans.append(StagePlan(ft_name, "finetune", ft, "finetune", f, "pretrain"))
        if pc.self_distill:
            ds = _stage_cfg("distill", pc, run_dir, f"distill_self_{tag}", pc.distill_self,
                            _fraction_layer(pc, f, "distill_self"), lab,
                            {"teacher_checkpoint": ft.run_dir, "model": model})
            plans.append(StagePlan(f"distill_self_{tag}", "distill", ds, "distill-self", f, ft_name))
        if pc.small_student:
            dsm = _stage_cfg("distill", pc, run_dir, f"distill_small_{tag}", pc.distill_small,
                             _fraction_layer(pc, f, "distill_small"), lab,
                             {"teacher_checkpoint": ft.run_dir, "model": pc.small_student})
            plans.append(StagePlan(f"distill_small_{tag}", "distill", dsm, "distill-small", f, ft_name))
    le = _stage_cfg("linear-eval", pc, run_dir, "linear_eval", pc.linear_eval, {"checkpoint": pre_dir})
    plans.append(StagePlan("linear_eval", "linear-eval", le, "linear-eval", le.label_fraction, "pretrain"))
    kn = _stage_cfg("knn-eval", pc, run_dir, "knn", pc.knn_eval, {"checkpoint": pre_dir})
    plans.append(StagePlan("knn", "knn-eval", kn, "knn", kn.label_fraction, "pretrain"))
    for f in pc.label_fractions:
        tag = fraction_tag(f)
        sup = _stage_cfg("supervised", pc, run_dir, f"supervised_{tag}", pc.supervised,
                         _fraction_layer(pc, f, "supervised"), {"label_fraction": f, "model": model})
        plans.append(StagePlan(f"supervised_{tag}", "supervised", sup, "supervised", f))
    return plans


def _runner(stage: str):
    from .engine import classify, pretrain, probe

    return {
        "pretrain": pretrain.run, "finetune": classify.run_finetune, "supervised": classify.run_supervised,
        "distill": classify.run_distill, "linear-eval": probe.run_linear_eval, "knn-eval": probe.run_knn_eval,
    }[stage]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def fingerprint(run_dir: str) -> str:
    """Identifies one finished run of a stage: the hash of its ``done.json`` (config hash, result
    and wall time), so a rerun of the stage, even with the same config, gives a new value."""
    return hashlib.sha256((Path(run_dir) / "done.json").read_bytes()).hexdigest()[:16]


def _seconds_before(cfg: Any) -> float:
    """Training seconds already spent by earlier processes, when the stage will resume from a
    checkpoint (its meta.json's ``train_seconds``); 0 for a stage that starts from step 0."""
    from . import checkpoint as ckpt

    last = ckpt.newest_sound_checkpoint(cfg.run_dir)[0] if cfg.resume else None  # the one resumed from
    return float(ckpt.read_meta(last).get("train_seconds", 0.0)) if last is not None else 0.0


def run_stage(plan: StagePlan, upstream: str | None = None) -> tuple[dict[str, Any], float, bool]:
    """Run one stage unless its ``done.json`` matches its config and ``upstream`` (the
    :func:`fingerprint` of the stage it reads); return (result, seconds, skipped)."""
    from .engine.runtime import config_changes

    values = dict(C.to_dict(plan.cfg), stage=plan.stage)
    h = C.config_hash(values)
    run_dir = Path(plan.cfg.run_dir)
    done, started = run_dir / "done.json", run_dir / "upstream.json"
    rec = _read_json(done)
    if rec is not None and rec.get("config_hash") == h and rec.get("upstream") == upstream and "result" in rec:
        return rec["result"], rec["seconds"], True
    # Start over, never resume, when the folder holds a finished run that no longer matches, or an
    # interrupted one with another config or upstream: its checkpoints would be the wrong ones.
    begun = _read_json(started)
    fresh = done.exists() or (begun is not None and begun.get("upstream") != upstream) or bool(
        config_changes(plan.cfg, plan.stage))
    dist.barrier()  # every process has decided before the main one rewrites the markers
    cfg = dataclasses.replace(plan.cfg, resume=False) if fresh and plan.cfg.resume else plan.cfg
    before = _seconds_before(cfg)
    if dist.launch_rank() == 0:  # the stage's folder is ours before its markers change
        run_dir.mkdir(parents=True, exist_ok=True)
        runlock.acquire(run_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        atomic_write_text(started, json.dumps({"upstream": upstream}))
    t0 = time.time()
    result = _runner(plan.stage)(cfg)
    seconds = round(before + time.time() - t0, 2)
    keep = {k: v for k, v in result.items() if k not in ("confusion_matrix",)}
    if dist.is_main():
        atomic_write_text(done, json.dumps({"config_hash": h, "upstream": upstream, "seconds": seconds,
                                            **({"seconds_before_resume": before} if before else {}),
                                            "result": keep}, indent=1))
    dist.barrier()  # done.json is on disk before any process fingerprints it
    runlock.release(run_dir)  # the stage is over; the pipeline's own lock stays
    return keep, seconds, False


def run_pipeline(pc: PipelineConfig) -> dict[str, Any]:
    from .engine.runtime import machine_description

    plans = plan_stages(pc)
    run_dir = Path(pc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.launch_rank() == 0:  # before the stages set up torchrun's process group
        runlock.acquire(run_dir)  # its own run.lock; each stage locks its sub-folder
    if dist.is_main():
        atomic_write_text(run_dir / "pipeline.yaml", C.dump_yaml(dataclasses.asdict(pc)))
    results, stages, prints = [], {}, {}
    t_all = time.time()
    probes = [i for i, p in enumerate(plans, 1) if p.stage in PROBE_STAGES]
    with contextlib.ExitStack() as shared:  # linear eval and kNN share one feature extraction
        for i, plan in enumerate(plans, 1):
            if dist.is_main():
                print(f"[{i}/{len(plans)}] {plan.name} ({plan.stage}) ...", flush=True)
            if probes and i == probes[0]:
                from .engine.probe import shared_features

                shared.enter_context(shared_features())
            result, seconds, skipped = run_stage(plan, prints[plan.upstream] if plan.upstream else None)
            prints[plan.name] = fingerprint(plan.cfg.run_dir)
            if probes and i == probes[-1]:
                shared.close()
            stages[plan.name] = seconds
            if dist.is_main():
                note = "skipped, done before" if skipped else f"{seconds:.0f} s"
                top1 = f" top1={result['top1']:.2f}" if "top1" in result else ""
                print(f"[{i}/{len(plans)}] {plan.name}: {note}{top1}", flush=True)
            if plan.method is not None:
                results.append({
                    "method": plan.method, "label_fraction": plan.label_fraction, "model": plan.cfg.model
                    if plan.stage not in PROBE_STAGES else plans[0].cfg.model,
                    "top1": result["top1"], "top5": result.get("top5"), "seconds": seconds,
                    "run_dir": plan.cfg.run_dir, **({"teacher_top1": result["teacher_top1"],
                                                     "teacher_agreement": result["teacher_agreement"]}
                                                    if "teacher_top1" in result else {}),
                })
    out = {
        "config_hash": C.config_hash(dataclasses.asdict(pc)),
        "machine": machine_description(),
        "total_seconds": round(time.time() - t_all, 2),
        "stages": stages,
        "results": results,
    }
    if dist.is_main():
        atomic_write_text(run_dir / "results.json", json.dumps(out, indent=1))
        from .report import write_report

        write_report(run_dir, out, pc)
    return out


def summary_table(out: dict[str, Any]) -> str:
    from .report import results_table

    return results_table(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="simclrv2 pipeline",
        description="Pretrain, fine-tune on each label fraction, distil, evaluate, train supervised "
        "baselines, and write results.json + report.md + plots into run_dir. Pipeline keys:\n"
        + C.describe(PipelineConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/fashion_mnist_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted: pretrain.epochs=5")
    args = parser.parse_args(argv)
    values = C.apply_overrides(C.load_yaml(args.config), args.overrides)
    pc = C.build(PipelineConfig, values)
    out = run_pipeline(pc)
    if dist.is_main():
        print()
        print(summary_table(out))
        print(f"\nwall time {out['total_seconds']:.0f} s; report: {Path(pc.run_dir) / 'report.md'}")
    dist.cleanup_distributed()
    return 0
