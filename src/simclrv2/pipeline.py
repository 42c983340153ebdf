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
from .engine.progress import position


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
    # Learning-rate search of fine-tuning and the supervised baseline: each trains once per factor
    # (times its own base_lr) and keeps the best top-1 on the validation split (common.val_fraction).
    # Both arms get the same factors. [] = no search.
    lr_search: list[float] = field(default_factory=list)
    # Wall-clock budget of the whole pipeline in minutes: pretraining gets the epochs that fill what
    # the other stages, measured on this machine, leave (simclrv2.budget). 0 = pretrain.epochs as given.
    budget_minutes: float = 0.0
    # The few-labels layout (data_dir/unlabeled/ + train/<class>/): with too few labels a class for a
    # held-out validation split, the search cross-validates over at most this many folds (simclrv2.search)
    cv_folds: int = 5
    # The few-labels layout: after predictions.csv, propose this many images of unlabeled/ to label
    # next (to_label.csv, as `simclrv2 select` writes it, from the pretrained encoder); 0 = none
    propose_labels: int = 0


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
    # learning-rate search: one run per candidate rate, in sub-folders; the best on the validation
    # split is this stage's result (and the teacher of the stages that read it)
    candidates: list[StagePlan] = field(default_factory=list)
    # cross-validation (search.CROSS_VALIDATION): the candidates are rate x fold runs, and the chosen
    # rate trains once more on every label; folds > 0 says how many folds a rate has
    folds: int = 0
    # a stage without a search, estimated by folds where no test split exists: one run per fold
    fold_plans: list[StagePlan] = field(default_factory=list)
    rate_choice: dict = field(default_factory=dict)  # search.SearchMode.record(): how the rate was chosen
    # why the stage is not run: a probe with no test split and no label to hold out has nothing to be
    # scored on; its row says so instead
    unscored: str = ""


def _with_search(plan: StagePlan, factors: list[float]) -> StagePlan:
    """``plan`` with one candidate per factor: base_lr * factor, run folder ``<stage>/lr_<rate>``."""
    for factor in factors:
        lr = plan.cfg.base_lr * factor
        cfg = dataclasses.replace(plan.cfg, base_lr=lr, run_dir=str(Path(plan.cfg.run_dir) / f"lr_{lr:.4g}"))
        plan.candidates.append(dataclasses.replace(plan, name=f"{plan.name}/lr_{lr:.4g}", cfg=cfg, candidates=[]))
    return plan


def _with_folds(plan: StagePlan, factors: list[float], folds: int) -> StagePlan:
    """``plan`` with one candidate per factor and fold: base_lr * factor trained on the other folds
    and scored on fold i, run folder ``<stage>/lr_<rate>_fold<i>``; the chosen rate's run on every
    label is made once it is known (:func:`run_cv_search`)."""
    for factor in factors:
        lr = plan.cfg.base_lr * factor
        for i in range(folds):
            cfg = dataclasses.replace(plan.cfg, base_lr=lr, val_folds=folds, val_fold=i,
                                      run_dir=str(Path(plan.cfg.run_dir) / f"lr_{lr:.4g}_fold{i}"))
            plan.candidates.append(dataclasses.replace(plan, name=f"{plan.name}/lr_{lr:.4g}_fold{i}", cfg=cfg,
                                                       candidates=[]))
    plan.folds = folds
    return plan


def _fold_runs(plan: StagePlan, folds: int) -> StagePlan:
    """``plan`` with one run per fold (``<stage>/fold<i>``), scored on its fold: the estimate of a
    stage without a search where there is no test split."""
    for i in range(folds):
        cfg = dataclasses.replace(plan.cfg, val_folds=folds, val_fold=i, run_dir=str(Path(plan.cfg.run_dir) / f"fold{i}"))
        plan.fold_plans.append(dataclasses.replace(plan, name=f"{plan.name}/fold{i}", cfg=cfg))
    return plan


# stages that evaluate the pretrained encoder; they share its features, and report its model
PROBE_STAGES = ("linear-eval", "knn-eval")
# each stage section of PipelineConfig and the stage whose config keys it holds
SECTIONS = {"pretrain": "pretrain", "finetune": "finetune", "supervised": "supervised",
            "distill_self": "distill", "distill_small": "distill", "linear_eval": "linear-eval",
            "knn_eval": "knn-eval"}
FRACTION_SECTIONS = ("finetune", "supervised", "distill_self", "distill_small")  # under by_fraction.<f>


def check_sections(pc: PipelineConfig) -> None:
    """Every key of ``common``, the stage sections and ``by_fraction`` names a config key of its
    stage with a value of its type; else a one-line :class:`~simclrv2.config.ConfigError`."""
    classes = {name: C.STAGE_CONFIGS[stage] for name, stage in SECTIONS.items()}
    # common: a key of any stage goes to the stages that have it, typed as the first one declares it
    known: dict[str, type] = {}
    for cls in C.STAGE_CONFIGS.values():
        known.update({f.name: cls for f in dataclasses.fields(cls) if f.name not in known})
    for key, value in pc.common.items():
        if key not in known:
            raise C.unknown_key(key, list(known), "common.")
        C.check_partial(known[key], {key: value}, "common.")
    for name, cls in classes.items():
        C.check_partial(cls, getattr(pc, name), f"{name}.")
    seen: dict[float, Any] = {}
    for frac, sections in pc.by_fraction.items():
        f = C.as_number(str(frac))
        where = f"by_fraction.{frac}"
        if f is None or not 0.0 < f <= 1.0:
            raise C.ConfigError(f"'{where}' is not a label fraction; by_fraction keys are numbers in (0, 1], e.g. 0.01")
        if f in seen:
            raise C.ConfigError(f"'{where}' and 'by_fraction.{seen[f]}' are the same label fraction; merge them")
        seen[f] = frac
        if not isinstance(sections, dict):
            raise C.ConfigError(f"config key '{where}' must be a mapping of stage sections, got {sections!r}")
        for name, values in sections.items():
            if name not in FRACTION_SECTIONS:
                raise C.unknown_key(name, list(FRACTION_SECTIONS), f"{where}.")
            if not isinstance(values, dict):
                raise C.ConfigError(f"config key '{where}.{name}' must be a mapping, got {values!r}")
            C.check_partial(classes[name], values, f"{where}.{name}.")


def _stage_cfg(stage: str, pc: PipelineConfig, run_dir: Path, name: str, *layers: dict) -> Any:
    values: dict[str, Any] = {}
    keys = {f.name for f in dataclasses.fields(C.STAGE_CONFIGS[stage])}
    for layer in (pc.common, *layers):
        values.update({k: v for k, v in layer.items() if k in keys or layer is not pc.common})
    values["run_dir"] = str(run_dir / name)
    cfg = C.build(C.STAGE_CONFIGS[stage], values, prefix=f"{name}.")
    C.validate(cfg)
    return cfg


def _typical_from(cfg: Any, pre_dir: str) -> Any:
    """``label_selection=typical`` (or ``probcover``) embeds with the pipeline's pretrained encoder,
    whatever the stage starts from (the supervised baseline and the distillation students start from
    random weights)."""
    if cfg.label_selection in ("typical", "probcover") and not cfg.label_encoder:
        return dataclasses.replace(cfg, label_encoder=pre_dir)
    return cfg


def _fraction_layer(pc: PipelineConfig, f: float, section: str) -> dict:
    for key, val in pc.by_fraction.items():
        if abs(float(key) - f) < 1e-12:
            return dict(val.get(section, {}))
    return {}


def plan_stages(pc: PipelineConfig) -> list[StagePlan]:
    from .search import CENTRE, CONFIG, CROSS_VALIDATION, HELD_OUT, few_labels_dir, search_modes

    check_sections(pc)
    if pc.cv_folds < 2:
        raise C.ConfigError(f"cv_folds must be 2 or more, got {pc.cv_folds}")
    modes = search_modes(pc)  # how each fraction's rates are chosen (simclrv2.search)
    few = few_labels_dir(pc.common)
    # folds or no search at all: no image is held out of the labels, and pretraining sees every image
    split = {"val_fraction": 0.0} if few and any(m.how in (CROSS_VALIDATION, CENTRE) for m in modes.values()) else {}
    tested = few is None or (few / str(pc.common.get("test_split", "test"))).is_dir()
    run_dir = Path(pc.run_dir)
    pre = _stage_cfg("pretrain", pc, run_dir, "pretrain", pc.pretrain, split)
    pre_dir = pre.run_dir
    plans = [StagePlan("pretrain", "pretrain", pre, None, None)]
    model = pre.model

    fixed = {"how": CONFIG}  # no search: the stage's base_lr as configured

    def searched(plan: StagePlan, f: float) -> StagePlan:
        mode = modes[f]
        plan.rate_choice = mode.record()
        if mode.how == CROSS_VALIDATION:
            return _with_folds(plan, pc.lr_search or [1.0], mode.folds)
        return _with_search(plan, pc.lr_search) if mode.how == HELD_OUT else plan

    for f in pc.label_fractions:
        tag = fraction_tag(f)
        lab = {"label_fraction": f}
        ft = _stage_cfg("finetune", pc, run_dir, f"finetune_{tag}", pc.finetune,
                        _fraction_layer(pc, f, "finetune"), lab, {"init_checkpoint": pre_dir, "model": model}, split)
        ft = _typical_from(ft, pre_dir)
        ft_name = f"finetune_{tag}"
        plans.append(searched(StagePlan(ft_name, "finetune", ft, "finetune", f, "pretrain"), f))
        if pc.self_distill:
            ds = _stage_cfg("distill", pc, run_dir, f"distill_self_{tag}", pc.distill_self,
                            _fraction_layer(pc, f, "distill_self"), lab,
                            {"teacher_checkpoint": ft.run_dir, "model": model}, split)
            ds = _typical_from(ds, pre_dir)
            plans.append(StagePlan(f"distill_self_{tag}", "distill", ds, "distill-self", f, ft_name,
                                   rate_choice=fixed))
        if pc.small_student:
            dsm = _stage_cfg("distill", pc, run_dir, f"distill_small_{tag}", pc.distill_small,
                             _fraction_layer(pc, f, "distill_small"), lab,
                             {"teacher_checkpoint": ft.run_dir, "model": pc.small_student}, split)
            dsm = _typical_from(dsm, pre_dir)
            plans.append(StagePlan(f"distill_small_{tag}", "distill", dsm, "distill-small", f, ft_name,
                                   rate_choice=fixed))
    for name, stage, section, method in (("linear_eval", "linear-eval", pc.linear_eval, "linear-eval"),
                                         ("knn", "knn-eval", pc.knn_eval, "knn")):
        cfg = _stage_cfg(stage, pc, run_dir, name, section, {"checkpoint": pre_dir}, split)
        plan = StagePlan(name, stage, cfg, method, cfg.label_fraction, "pretrain", rate_choice=fixed)
        probe_mode = search_modes(dataclasses.replace(pc, label_fractions=[cfg.label_fraction]))[cfg.label_fraction]
        if not tested and split and probe_mode.how == CROSS_VALIDATION:  # scored on folds: there is no test split
            plan = _fold_runs(plan, probe_mode.folds)
        elif not tested and split:
            plan.unscored = "no test split, and one label in a class leaves none to hold out"
        plans.append(plan)
    for f in pc.label_fractions:
        tag = fraction_tag(f)
        sup = _stage_cfg("supervised", pc, run_dir, f"supervised_{tag}", pc.supervised,
                         _fraction_layer(pc, f, "supervised"), {"label_fraction": f, "model": model}, split)
        sup = _typical_from(sup, pre_dir)
        plans.append(searched(StagePlan(f"supervised_{tag}", "supervised", sup, "supervised", f), f))
    if pc.lr_search and not pre.val_fraction > 0 and not few:
        raise C.ConfigError("lr_search needs a validation split to choose on; set common.val_fraction "
                            "(e.g. 0.1), or lr_search=[] to train each stage at its base_lr")
    return plans


def _runner(stage: str):
    from .engine import distill, finetune, pretrain, probe, supervised

    return {
        "pretrain": pretrain.run, "finetune": finetune.run, "supervised": supervised.run,
        "distill": distill.run, "linear-eval": probe.run_linear_eval, "knn-eval": probe.run_knn_eval,
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


def run_stage(plan: StagePlan, upstream: str | None = None, test: bool = True) -> tuple[dict[str, Any], float, bool]:
    """Run one stage unless its ``done.json`` matches its config and ``upstream`` (the
    :func:`fingerprint` of the stage it reads); return (result, seconds, skipped).

    ``test=False`` evaluates on the validation split only (a search candidate). A candidate that
    is chosen later runs again with ``test=True``: it resumes at its last step, so only the test
    evaluation runs, and its seconds add to the training's.
    """
    from .engine.runfolder import config_changes

    values = dict(C.to_dict(plan.cfg), stage=plan.stage)
    h = C.config_hash(values)
    run_dir = Path(plan.cfg.run_dir)
    done, started = run_dir / "done.json", run_dir / "upstream.json"
    rec = _read_json(done)
    same = rec is not None and rec.get("config_hash") == h and rec.get("upstream") == upstream and "result" in rec
    if same and (rec.get("tested", True) or not test):
        return rec["result"], rec["seconds"], True
    evaluate_only = same and test  # trained and validated before; the test evaluation is missing
    # Start over, never resume, when the folder holds a finished run that no longer matches, or an
    # interrupted one with another config or upstream: its checkpoints would be the wrong ones.
    begun = _read_json(started)
    fresh = not evaluate_only and (done.exists() or (begun is not None and begun.get("upstream") != upstream)
                                   or bool(config_changes(plan.cfg, plan.stage)))
    dist.barrier()  # every process has decided before the main one rewrites the markers
    cfg = dataclasses.replace(plan.cfg, resume=False) if fresh and plan.cfg.resume else plan.cfg
    if evaluate_only:
        cfg = dataclasses.replace(cfg, resume=True)  # from the last checkpoint: no step is trained again
    before = rec["seconds"] if evaluate_only else _seconds_before(cfg)
    if dist.launch_rank() == 0:  # the stage's folder is ours before its markers change
        run_dir.mkdir(parents=True, exist_ok=True)
        runlock.acquire(run_dir)
    if dist.launch_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)
        atomic_write_text(started, json.dumps({"upstream": upstream}))
    t0 = time.time()
    runner = _runner(plan.stage)
    result = runner(cfg, test=test) if plan.stage in SEARCHABLE_STAGES + ("distill",) else runner(cfg)
    seconds = round(before + time.time() - t0, 2)
    keep = {k: v for k, v in result.items() if k not in ("confusion_matrix",)}
    if dist.launch_rank() == 0:
        atomic_write_text(done, json.dumps({"config_hash": h, "upstream": upstream, "seconds": seconds,
                                            "tested": test,
                                            **({"seconds_before_resume": before} if before else {}),
                                            "result": keep}, indent=1))
    dist.barrier()  # done.json is on disk before any process fingerprints it
    runlock.release(run_dir)  # the stage is over; the pipeline's own lock stays
    return keep, seconds, False


SEARCHABLE_STAGES = ("finetune", "supervised")


def run_search(plan: StagePlan, upstream: str | None) -> tuple[StagePlan, dict[str, Any], float, bool]:
    """Train every candidate of ``plan``, choose the best on the validation split, test only it.

    Returns (chosen candidate, its result with the search recorded, seconds of all candidates,
    whether everything was done before). Ties go to the smaller rate (candidates run in order).
    """
    scores: dict[str, float] = {}
    seconds, all_skipped = 0.0, True
    best: tuple[float, float, StagePlan] | None = None  # (val top-1, training seconds, candidate)
    for cand in plan.candidates:
        res, sec, skipped = run_stage(cand, upstream, test=False)
        seconds += sec
        all_skipped &= skipped
        scores[f"{cand.cfg.base_lr:.4g}"] = res["val_top1"]
        if best is None or res["val_top1"] > best[0]:
            best = (res["val_top1"], sec, cand)
    assert best is not None, "a search plan has at least one candidate"
    _, trained, chosen = best
    result, sec, skipped = run_stage(chosen, upstream, test=True)
    seconds += sec - trained  # the chosen one's seconds include its training, counted above
    rates = [c.cfg.base_lr for c in plan.candidates]
    edge = len(rates) > 1 and chosen.cfg.base_lr in (min(rates), max(rates))
    if dist.launch_rank() == 0:  # the stage folder stands for its choice: predict, export and friends read it
        atomic_write_text(Path(plan.cfg.run_dir) / "chosen.json", json.dumps({
            "chosen": Path(chosen.cfg.run_dir).name, "base_lr": chosen.cfg.base_lr, "val_top1": scores}, indent=1))
    result = dict(result, base_lr=chosen.cfg.base_lr, lr_search=scores, lr_at_edge=edge)
    return chosen, result, round(seconds, 2), all_skipped and skipped


def run_cv_search(plan: StagePlan, upstream: str | None) -> tuple[StagePlan, dict[str, Any], float, bool]:
    """Cross-validated search: every rate trains once per fold on the other folds and is scored on
    its fold; the rate with the best mean fold top-1 then trains on every label (and is tested).

    No fold's score comes from an image it trained on (``val_folds``: the fold is the validation
    split, the other folds the labelled subset). Returns what :func:`run_search` returns; the
    result's ``val_top1`` is the chosen rate's mean over folds, ``val_spread`` their standard deviation.
    """
    from .search import spread

    folds: dict[float, list[float]] = {}
    dirs: dict[float, list[str]] = {}
    seconds, all_skipped, images = 0.0, True, 0
    for cand in plan.candidates:
        res, sec, skipped = run_stage(cand, upstream, test=False)
        seconds += sec
        all_skipped &= skipped
        folds.setdefault(cand.cfg.base_lr, []).append(res["val_top1"])
        dirs.setdefault(cand.cfg.base_lr, []).append(cand.cfg.run_dir)
        images += res.get("val_images", 0)
    means = {lr: sum(v) / len(v) for lr, v in folds.items()}
    best = next(lr for lr in means if means[lr] == max(means.values()))  # ties: the first (smaller) rate
    name = f"lr_{best:.4g}"
    final = dataclasses.replace(plan, name=f"{plan.name}/{name}", candidates=[], folds=0,
                                cfg=dataclasses.replace(plan.cfg, base_lr=best, run_dir=str(Path(plan.cfg.run_dir) / name)))
    result, sec, skipped = run_stage(final, upstream, test=True)
    seconds += sec
    rates = list(means)
    scores = {f"{lr:.4g}": round(m, 4) for lr, m in means.items()}
    if dist.launch_rank() == 0:  # the stage folder stands for the run on every label
        atomic_write_text(Path(plan.cfg.run_dir) / "chosen.json", json.dumps({
            "chosen": name, "base_lr": best, "val_top1": scores,
            "folds": {f"{lr:.4g}": v for lr, v in folds.items()}}, indent=1))
    result = dict(result, base_lr=best, lr_search=scores, lr_at_edge=len(rates) > 1 and best in (min(rates), max(rates)),
                  val_top1=round(means[best], 4), val_spread=round(spread(folds[best]), 4),
                  val_images=images // len(rates), folds=plan.folds, fold_dirs=dirs[best])
    return final, result, round(seconds, 2), all_skipped and skipped


def run_folds(plan: StagePlan, upstream: str | None) -> tuple[dict[str, Any], float, bool, str]:
    """A probe scored by folds (no test split): one run per fold, the mean and spread of their
    top-1; returns (result, seconds, skipped, the last fold's folder)."""
    from .search import spread

    scores, seconds, all_skipped, images, res = [], 0.0, True, 0, {}
    for fold in plan.fold_plans:
        res, sec, skipped = run_stage(fold, upstream)
        scores.append(res["val_top1"])
        seconds += sec
        all_skipped &= skipped
        images += res.get("val_images", 0)
    result = dict(res, val_top1=round(sum(scores) / len(scores), 4), val_spread=round(spread(scores), 4),
                  val_images=images, folds=len(scores), fold_dirs=[f.cfg.run_dir for f in plan.fold_plans])
    return result, round(seconds, 2), all_skipped, plan.fold_plans[-1].cfg.run_dir


def _run_plan(plan: StagePlan, upstream: str | None) -> tuple[dict[str, Any], float, bool, str]:
    """One planned stage, its search or its folds; (result, seconds, skipped, the folder that stands for it)."""
    if plan.candidates:
        chosen, result, seconds, skipped = (run_cv_search if plan.folds else run_search)(plan, upstream)
        return dict(result, rate_choice=plan.rate_choice), seconds, skipped, chosen.cfg.run_dir
    if plan.fold_plans:
        result, seconds, skipped, out_dir = run_folds(plan, upstream)
        return dict(result, rate_choice=plan.rate_choice), seconds, skipped, out_dir
    if plan.unscored:
        return {"unscored": plan.unscored, "model": plan.cfg.model}, 0.0, True, ""
    result, seconds, skipped = run_stage(plan, upstream)
    if plan.rate_choice:
        result = dict(result, rate_choice=plan.rate_choice)
    return result, seconds, skipped, plan.cfg.run_dir


def _fit_budget(pc: PipelineConfig, device: Any) -> tuple[PipelineConfig, dict[str, Any] | None]:
    """``pc`` with pretraining sized to ``budget_minutes`` (and the other stages scaled to fit),
    measured on ``device``; under torchrun rank 0 measures and every rank gets its answer."""
    if pc.budget_minutes <= 0:
        return pc, None
    from .budget import fit_pretraining, scale_stages

    budget = fit_pretraining(pc, device)
    pc = dataclasses.replace(scale_stages(pc, budget.get("other_scale", 1.0)), budget_minutes=0.0,
                             pretrain=dict(pc.pretrain, epochs=budget["epochs"]))
    if "native_image_size" in budget:  # the images' own size did not fit; pinned like the epochs
        pc = dataclasses.replace(pc, common=dict(pc.common, image_size=budget["image_size"]))
    if "cv_folds" in budget:  # the search's folds did not fit; fewer, pinned like the epochs
        pc = dataclasses.replace(pc, cv_folds=budget["cv_folds"])
    return pc, budget


def run_pipeline(pc: PipelineConfig) -> dict[str, Any]:
    from .engine.device import resolve_device
    from .engine.runfolder import check_shared_run_dir, machine_description

    plans = plan_stages(pc)  # checks every stage's config before anything is written
    run_dir = Path(pc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.launch_rank() == 0:  # before torchrun's process group exists
        runlock.acquire(run_dir)  # its own run.lock; each stage locks its sub-folder
    # Under torchrun, the process group first: every rank then reads what rank 0 decides (the
    # budget's epochs) instead of deciding alone, and they all see one run folder or all stop.
    device = resolve_device(plans[0].cfg.device)
    check_shared_run_dir(run_dir)
    pc, budget = _fit_budget(pc, device)
    if budget is not None:
        plans = plan_stages(pc)
    # launch_rank throughout, not is_main: the first stage creates the process group, and until then
    # every torchrun rank would take itself for rank 0 (and print each line, write each file, twice)
    if dist.launch_rank() == 0:  # the resolved config: with a budget, the epochs it chose, so a rerun repeats them
        atomic_write_text(run_dir / "pipeline.yaml", C.dump_yaml(dataclasses.asdict(pc)))
    results, stages, prints, chosen_dirs = [], {}, {}, {}
    pretrained: dict[str, Any] = {}
    t_all = time.time()
    probes = [i for i, p in enumerate(plans, 1) if p.stage in PROBE_STAGES]
    with contextlib.ExitStack() as shared:  # linear eval and kNN share one feature extraction
        for i, plan in enumerate(plans, 1):
            if dist.launch_rank() == 0:
                print(f"[{i}/{len(plans)}] {plan.name} ({plan.stage}) ...", flush=True)
            if probes and i == probes[0]:
                from .engine.probe import shared_features

                shared.enter_context(shared_features())
            if plan.stage == "distill" and plan.upstream in chosen_dirs:  # the teacher its search chose
                plan = dataclasses.replace(plan, cfg=dataclasses.replace(
                    plan.cfg, teacher_checkpoint=chosen_dirs[plan.upstream]))
            upstream = prints[plan.upstream] if plan.upstream else None
            with position(f"[{i}/{len(plans)}] {plan.name}"):  # the stage's progress bar or lines say where it is
                result, seconds, skipped, out_dir = _run_plan(plan, upstream)
            if plan.candidates:
                chosen_dirs[plan.name] = out_dir
            prints[plan.name] = fingerprint(out_dir) if out_dir else ""  # "": not run (unscored)
            if probes and i == probes[-1]:
                shared.close()
            stages[plan.name] = seconds
            if dist.launch_rank() == 0:
                print(f"[{i}/{len(plans)}] {plan.name}: {_stage_line(result, seconds, skipped)}", flush=True)
            if plan.method is not None:
                results.append(_result_row(plan, plans[0], result, seconds, out_dir))
            elif plan.stage == "pretrain":
                pretrained = {"epochs": plan.cfg.epochs, "steps": result.get("steps"),
                              "knn_top1": result.get("knn_top1")}
    out = {
        "config_hash": C.config_hash(dataclasses.asdict(pc)),
        "machine": machine_description(),
        "total_seconds": round(time.time() - t_all, 2),
        "stages": stages,
        "pretrain": pretrained,
        "results": results,
    }
    if budget is not None:
        out["budget"] = budget
    _label_unlabeled(pc, plans, out)
    if dist.launch_rank() == 0:
        atomic_write_text(run_dir / "results.json", json.dumps(out, indent=1))
        from .report import write_report

        write_report(run_dir, out, pc)
    return out


def _stage_line(result: dict[str, Any], seconds: float, skipped: bool) -> str:
    note = "skipped, done before" if skipped else f"{seconds:.0f} s"
    top1 = f" top1={result['top1']:.2f}" if result.get("top1") is not None else ""
    if result.get("top1") is None and "val_top1" in result:
        top1 = f" validation top1={result['val_top1']:.2f} (no test split)"
    how = (result.get("rate_choice") or {}).get("how", "validation split")
    lr = f" (base_lr {result['base_lr']:g} chosen by {how})" if "base_lr" in result else ""
    return f"{note}{top1}{lr}"


def _label_unlabeled(pc: PipelineConfig, plans: list[StagePlan], out: dict[str, Any]) -> None:
    """The few-labels layout ends with ``predictions.csv``: a class for every unlabeled image, from
    the model chosen by :func:`simclrv2.labelling.choose_model` (recorded in ``out["predictions"]``)."""
    from .search import few_labels_dir

    if few_labels_dir(pc.common) is None:
        return
    from .labelling import calibration, choose_model, held_out_predictions, label_folder

    row, reason = choose_model(out["results"])
    if row is None:
        return
    stage_cfg = next(p.cfg for p in plans if p.method == row["method"] and p.label_fraction == row["label_fraction"])
    summary = label_folder(stage_cfg, row["run_dir"], Path(pc.run_dir) / "predictions.csv")
    probs, labels, whose = held_out_predictions(row, out["results"])
    out["predictions"] = dict(summary, method=row["method"], label_fraction=row["label_fraction"],
                              model_dir=row["run_dir"], reason=reason, calibration_from=whose,
                              calibration=calibration(probs, labels, summary.pop("confidence")))
    if pc.propose_labels > 0 and dist.is_main():  # the embedding is not sharded: rank 0 alone
        from .select import propose_for_folder

        pre = next(p for p in plans if p.stage == "pretrain")
        to_label = Path(pc.run_dir) / "to_label.csv"
        propose_for_folder(pre.cfg.run_dir, pre.cfg.data_dir, pc.propose_labels, to_label, seed=pre.cfg.seed,
                           device=pre.cfg.device)
        out["to_label"] = {"file": str(to_label), "images": pc.propose_labels}


def _result_row(plan: StagePlan, pretrain: StagePlan, result: dict[str, Any], seconds: float,
                out_dir: str) -> dict[str, Any]:
    """One ``results.json`` row: the test top-1 (None without a test split), what was chosen on the
    validation split or folds, and the estimate those give (``estimate``: kind, top-1, spread, images)."""
    row = {
        "method": plan.method, "label_fraction": plan.label_fraction,
        "model": plan.cfg.model if plan.stage not in PROBE_STAGES else pretrain.cfg.model,
        "top1": result.get("top1"), "top5": result.get("top5"), "seconds": seconds, "run_dir": out_dir,
        "num_classes": len(result.get("per_class_accuracy", [])) or _num_classes(result, plan) or None,
        "steps": result.get("steps"),
    }
    for key in ("val_top1", "base_lr", "lr_search", "lr_at_edge", "teacher_top1", "teacher_agreement",
                "rate_choice", "folds", "fold_dirs", "unscored"):
        if key in result:
            row[key] = result[key]
    if "val_top1" in result:
        from .search import binomial_spread

        folds = result.get("folds")
        row["estimate"] = {
            "kind": f"{folds}-fold cross-validation" if folds else "validation split",
            "top1": result["val_top1"], "images": result.get("val_images"),
            # folds: the standard deviation of the fold scores; a split: the binomial standard error
            "spread": result.get("val_spread") if folds else round(
                binomial_spread(result["val_top1"], result.get("val_images") or 1), 4),
        }
    return row


def _num_classes(result: dict[str, Any], plan: StagePlan) -> int | None:
    """Classes of a stage that was not tested (no per-class accuracies): from its config's data."""
    if result.get("top1") is not None:
        return None
    from .search import few_labels_dir, label_counts

    data_dir = few_labels_dir({"dataset": plan.cfg.dataset, "data_dir": plan.cfg.data_dir})
    return len(label_counts(data_dir)[0]) if data_dir is not None else None


def summary_table(out: dict[str, Any]) -> str:
    from .report import results_table

    return results_table(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="simclrv2 pipeline",
        description="Pretrain, fine-tune on each label fraction, distil, evaluate, train supervised "
        "baselines, and write results.json + report.md + plots into run_dir. Pipeline keys:\n"
        + C.describe(PipelineConfig)
        + "\n\nOverrides are key=value, dotted for sections; a section takes the keys of its stage "
        "(`simclrv2 <stage> --help`), common takes the keys of any stage:\n"
        "  common.batch_size=128  pretrain.epochs=5  pretrain.memory.enabled=true\n"
        "A label fraction under by_fraction is one key, dots included (0.01, 0.001, 1e-3 all work):\n"
        "  by_fraction.0.01.finetune.epochs=1  by_fraction.0.1.supervised.base_lr=0.2\n"
        f"by_fraction sections: {', '.join(FRACTION_SECTIONS)}. An unknown key is an error (exit 2) "
        "before anything is written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/fashion_mnist_demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted: pretrain.epochs=5, "
                        "by_fraction.0.01.finetune.epochs=1")
    args = parser.parse_args(argv)
    values = C.apply_overrides(C.load_yaml(args.config), args.overrides)
    pc = C.build(PipelineConfig, values)
    out = run_pipeline(pc)
    if dist.launch_rank() == 0:
        print()
        print(summary_table(out))
        from .report import warnings

        for line in warnings(out):
            print(f"warning: {line}")
        print(f"\nwall time {out['total_seconds']:.0f} s; report: {Path(pc.run_dir) / 'report.md'}")
    dist.cleanup_distributed()
    return 0
