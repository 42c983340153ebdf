"""The pipeline's plan: its typed config and the stage each run folder gets.

``plan_stages`` turns a :class:`PipelineConfig` into the list of :class:`StagePlan` that
``simclrv2.pipeline`` runs and ``simclrv2.budget`` times. Both import it; it imports neither
(DESIGN.md "Layers"). Configs and plans only: nothing here trains or reads an image.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as C
from .stages import STAGES


@dataclass
class PipelineConfig:
    """The pipeline: which stages, and the keys each stage gets on top of its own defaults."""

    run_dir: str = "runs/pipeline"
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    self_distill: bool = True  # distil each teacher into its own architecture
    # where the self-distilled student starts: random (random weights) | pretrained (the pipeline's
    # pretrained encoder, where its teacher started; distill_self.student_init, if set, wins)
    self_distill_init: str = "random"
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


# the sub-folder of a supervised stage that holds its search with colour-distorted views (StagePlan.retry)
COLOUR_RETRY = "color"


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
    # the supervised baseline: the same search with colour-distorted views (pretraining's strength),
    # in <stage>/color; the better of the two searches is kept (pipeline.run_retry)
    retry: StagePlan | None = None


def _with_search(plan: StagePlan, factors: list[float]) -> StagePlan:
    """``plan`` with one candidate per factor: base_lr * factor, run folder ``<stage>/lr_<rate>``."""
    plan.candidates += [rate_candidate(plan, plan.cfg.base_lr * factor) for factor in factors]
    return plan


def rate_candidate(plan: StagePlan, lr: float) -> StagePlan:
    """The run of rate ``lr`` in a search on the validation split, in ``<stage>/lr_<rate>``."""
    cfg = dataclasses.replace(plan.cfg, base_lr=lr, run_dir=str(Path(plan.cfg.run_dir) / f"lr_{lr:.4g}"))
    return dataclasses.replace(plan, name=f"{plan.name}/lr_{lr:.4g}", cfg=cfg, candidates=[])


def _with_folds(plan: StagePlan, factors: list[float], folds: int) -> StagePlan:
    """``plan`` with one candidate per factor and fold: base_lr * factor trained on the other folds
    and scored on fold i, run folder ``<stage>/lr_<rate>_fold<i>``; the chosen rate's run on every
    label is made once it is known (:func:`run_cv_search`)."""
    for factor in factors:
        plan.candidates += fold_candidates(plan, plan.cfg.base_lr * factor, folds)
    plan.folds = folds
    return plan


def planned_rates(plan: StagePlan) -> list[float]:
    """The rates of ``plan``'s search, in order (each fold's run of a rate counts once)."""
    return sorted({c.cfg.base_lr for c in plan.candidates})


def fold_candidates(plan: StagePlan, lr: float, folds: int) -> list[StagePlan]:
    """The ``folds`` runs of rate ``lr``: run ``i`` trains on the other folds and is scored on fold
    ``i``, in ``<stage>/lr_<rate>_fold<i>``."""
    runs = []
    for i in range(folds):
        cfg = dataclasses.replace(plan.cfg, base_lr=lr, val_folds=folds, val_fold=i,
                                  run_dir=str(Path(plan.cfg.run_dir) / f"lr_{lr:.4g}_fold{i}"))
        runs.append(dataclasses.replace(plan, name=f"{plan.name}/lr_{lr:.4g}_fold{i}", cfg=cfg, candidates=[]))
    return runs


def _fold_runs(plan: StagePlan, folds: int) -> StagePlan:
    """``plan`` with one run per fold (``<stage>/fold<i>``), scored on its fold: the estimate of a
    stage without a search where there is no test split."""
    for i in range(folds):
        cfg = dataclasses.replace(plan.cfg, val_folds=folds, val_fold=i, run_dir=str(Path(plan.cfg.run_dir) / f"fold{i}"))
        plan.fold_plans.append(dataclasses.replace(plan, name=f"{plan.name}/fold{i}", cfg=cfg))
    return plan


# each stage section of PipelineConfig and the stage whose config keys it holds (simclrv2.stages)
SECTIONS = {section: stage.name for stage in STAGES.values() for section in stage.sections}
# the sections that may appear under by_fraction.<f>: those of the stages trained per label fraction
FRACTION_SECTIONS = tuple(section for stage in STAGES.values() if stage.per_fraction for section in stage.sections)


def _with_colour_retry(plan: StagePlan, strength: float, searched: Any) -> StagePlan:
    """The baseline ``plan`` with its search planned again at colour ``strength`` (pretraining's)
    in ``<stage>/color`` (``plan.retry``), where it has a search and distorts no colours itself;
    ``searched(plan, fraction)`` plans a search as ``plan``'s was."""
    sup = plan.cfg
    if plan.candidates and sup.color_strength == 0 and strength > 0:
        coloured = dataclasses.replace(sup, color_strength=strength, run_dir=str(Path(sup.run_dir) / COLOUR_RETRY))
        plan.retry = searched(StagePlan(f"{plan.name}/{COLOUR_RETRY}", "supervised", coloured, "supervised",
                                        plan.label_fraction), plan.label_fraction)
    return plan


def check_sections(pc: PipelineConfig) -> None:
    """Every key of ``common``, the stage sections and ``by_fraction`` names a config key of its
    stage with a value of its type; else a one-line :class:`~simclrv2.config.ConfigError`."""
    classes = {name: STAGES[stage].config for name, stage in SECTIONS.items()}
    # common: a key of any stage goes to the stages that have it, typed as the first one declares it
    known: dict[str, type] = {}
    for cls in (stage.config for stage in STAGES.values()):
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
    keys = {f.name for f in dataclasses.fields(STAGES[stage].config)}
    for layer in (pc.common, *layers):
        values.update({k: v for k, v in layer.items() if k in keys or layer is not pc.common})
    values["run_dir"] = str(run_dir / name)
    cfg = C.build(STAGES[stage].config, values, prefix=f"{name}.")
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
    if pc.self_distill_init not in ("random", "pretrained"):
        raise C.ConfigError(f"self_distill_init must be random or pretrained, got {pc.self_distill_init!r}")
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
        """``plan`` with how its base_lr is chosen: by fraction f's search mode for a stage whose
        rate is searched (``Stage.lr_search``), else as configured."""
        if not STAGES[plan.stage].lr_search:
            plan.rate_choice = fixed
            return plan
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
            if pc.self_distill_init == "pretrained" and not ds.student_init:
                ds = dataclasses.replace(ds, student_init=pre_dir)
            plans.append(searched(StagePlan(f"distill_self_{tag}", "distill", ds, "distill-self", f, ft_name), f))
        if pc.small_student:
            dsm = _stage_cfg("distill", pc, run_dir, f"distill_small_{tag}", pc.distill_small,
                             _fraction_layer(pc, f, "distill_small"), lab,
                             {"teacher_checkpoint": ft.run_dir, "model": pc.small_student}, split)
            dsm = _typical_from(dsm, pre_dir)
            plans.append(searched(StagePlan(f"distill_small_{tag}", "distill", dsm, "distill-small", f, ft_name), f))
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
        plans.append(_with_colour_retry(searched(StagePlan(f"supervised_{tag}", "supervised", sup, "supervised", f), f),
                                        pre.color_strength, searched))
    if pc.lr_search and not pre.val_fraction > 0 and not few:
        raise C.ConfigError("lr_search needs a validation split to choose on; set common.val_fraction "
                            "(e.g. 0.1), or lr_search=[] to train each stage at its base_lr")
    return plans
