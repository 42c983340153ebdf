"""``budget_minutes``: size pretraining so that the whole pipeline fits a wall-clock budget.

Every stage but pretraining has a length fixed by its config (steps from ``epochs`` and
``min_steps``, evaluations over known splits). So the pipeline measures, on this machine and
before anything trains, how long one training step of each stage takes and how long one image
takes through each model in evaluation; it then adds the other stages up and gives pretraining
the epochs that fill what is left. A fast machine pretrains longer; a slow one still finishes.

The measurement uses the stages' own models, batch sizes and augmentations on random images, a
warm-up step first. A pretraining step is the stage's own (``engine.pretrain``'s parts, views and
``train_step``, in the precision the stage trains in, at learning rate 0 on parts built for the
measurement); so is a fine-tuning or baseline step (``engine.classify.classifier_step``, the stage's
optimizer at learning rate 0, its precision), and a distillation step is a frozen teacher's forward
pass plus that step (:meth:`_StepTimer.classifier_step`). Measuring takes a few seconds and is
counted in the budget. The choice is stored in ``<run_dir>/budget.json`` under a hash of the
pipeline config, so running the same command again (to resume after an interruption, say) reuses
it instead of measuring again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import config as C
from . import distributed as dist
from .checkpoint import atomic_write_text
from .engine.deadline import Deadline
from .plan import FRACTION_SECTIONS, SECTIONS, PipelineConfig, plan_stages, planned_rates
from .stages import STAGES

# The estimate leaves this share of the budget unplanned: checkpoints, logging, the online probe
# and the run-to-run spread of step times are not measured (docs/EXPERIMENTS.md records how far
# real runs went past the estimate).
MARGIN = 0.12
# The stages after pretraining may take at most this share of the planned time; on a machine so
# slow that they would take more, their steps (min_steps and epochs) shrink to fit, so the
# pipeline still finishes and pretraining keeps the rest. Half, not 0.6: where the share binds,
# pretraining epochs are worth more than the other stages' steps. On the demo's validation split,
# 1% labels, 7 pretraining epochs and 150 steps each put fine-tuning 2.78 points over the baseline,
# 5 epochs and 181 steps 0.55 (docs/EXPERIMENTS.md, "The budget's split").
OTHER_SHARE = 0.5
MIN_SCALE = 0.1  # never shrink them below a tenth: then the budget is an error instead
# Timed steps per measurement, after one warm-up step. The fastest counts: a step slowed by another
# process for a moment (a measurement takes seconds, the run it sizes minutes) would otherwise size
# the whole run for a slower machine.
TIMED_STEPS = 3
# With image_size 0 (the dataset's own), a budget too small for the images' size trains at a smaller
# one, never below this: the small encoders' stems are made for 28-96 px (METHOD.md 1.4).
SMALLEST_AUTO_SIZE = 32
CPU = torch.device("cpu")


def fit_pretraining(pc: PipelineConfig, device: torch.device = CPU) -> dict[str, Any]:
    """The pretraining epochs that fit ``pc.budget_minutes``, with the estimate behind them.

    ``device`` is the one the stages train on, where the steps are timed. Under torchrun the
    process group must exist: rank 0 alone measures (or reads ``budget.json``), and every process
    gets its answer, or its error, so they all train the same number of steps. The global random
    generators are left as they were.
    """
    from .engine.device import global_rng_kept

    rec, error = None, None
    if dist.is_main():
        try:
            # rank 0 builds and times the stages' steps alone (no DDP, no gathering across ranks),
            # and the stages draw from the global generators as they would without a budget
            with dist.alone(), global_rng_kept(device):
                rec = _read_or_fit(pc, device)
        except C.ConfigError as e:
            error = str(e)
    rec, error = dist.broadcast_object((rec, error))
    if error is not None:
        raise C.ConfigError(error if dist.is_main() else f"rank 0 stopped: {error}")
    return rec


def deadline(rec: dict[str, Any], started: float) -> Deadline:
    """The end that pretraining keeps (:mod:`~simclrv2.engine.deadline`) for the budget ``rec``
    fitted from ``started`` (``time.time()``): half of the margin past the planned end, so that a
    run at the measured pace never meets it, and one that slows down still ends in the budget."""
    return Deadline(started + rec["budget_minutes"] * 60 * (1 - MARGIN / 2), rec["epoch_seconds"],
                    rec["other_seconds"])


def regrown_scale(rec: dict[str, Any], started: float, now: float, pace: float) -> float | None:
    """The later stages' share of their steps once pretraining has ended, ``now``, where the budget
    ``rec`` (fitted from ``started``) had shrunk them (``other_scale`` below 1) and pretraining ran
    at ``pace`` times its estimate (its seconds over its epochs' estimated seconds). The
    measurement in the run's first minute can catch the machine slow: the demo once measured 33.8 s
    an epoch and pretrained at 29.2, so its later stages got 41% of their steps and it ended 229 s
    early (docs/EXPERIMENTS.md, "The later stages take the time pretraining left"). So their
    estimate, slowed or sped by the same pace, gets the time left to the planned end: the share
    that fills it, at most 1. None where that is no more than ``other_scale`` (pretraining's
    deadline already saw to a slower machine), or where ``rec`` predates the split of its estimate."""
    scale, train, fixed = rec.get("other_scale", 1.0), rec.get("other_train_seconds"), rec.get("other_fixed_seconds")
    if scale >= 1.0 or not train or fixed is None or pace <= 0:
        return None
    left = started + rec["budget_minutes"] * 60 * (1 - MARGIN) - now
    grown = round(min(1.0, (left / pace - fixed) / train), 4)
    return grown if grown > scale else None


def pin(run_dir: str | Path, rec: dict[str, Any]) -> None:
    """Write ``rec`` to ``<run_dir>/budget.json``: the budget's choice, and what is added to it
    during the run, so that a rerun of the same config repeats both (rank 0 alone)."""
    if dist.launch_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / "budget.json", json.dumps(rec, indent=1))


def _read_or_fit(pc: PipelineConfig, device: torch.device) -> dict[str, Any]:
    """Rank 0's part of :func:`fit_pretraining`: the stored choice for this config, or a new one."""
    path = Path(pc.run_dir) / "budget.json"
    key = C.config_hash(dataclasses.asdict(pc))
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        rec = None
    if not isinstance(rec, dict) or rec.get("config_hash") != key:
        rec = dict(_measure_and_fit(pc, device), config_hash=key)
        pin(pc.run_dir, rec)
        if "native_image_size" in rec:
            print(f"budget: {rec['native_image_size']} px images would leave too little of "
                  f"{pc.budget_minutes:g} min; training at {rec['image_size']} px (set common.image_size "
                  "to choose, or raise budget_minutes)", flush=True)
        print(f"budget: {pc.budget_minutes:g} min; the other stages take about "
              f"{rec['other_seconds']:.0f} s here, one pretraining epoch {rec['epoch_seconds']:.1f} s: "
              f"pretraining {rec['epochs']:g} epochs", flush=True)
        if "cv_folds" in rec:
            print(f"budget: {rec['cv_folds_wanted']} cross-validation folds would leave pretraining no epoch "
                  f"of {pc.budget_minutes:g} min; searching with {rec['cv_folds']} folds (raise budget_minutes "
                  "for more)", flush=True)
    else:
        print(f"budget: pretraining {rec['epochs']:g} epochs, as chosen before ({path})", flush=True)
    return rec


def _measure_and_fit(pc: PipelineConfig, device: torch.device) -> dict[str, Any]:
    """Measure and fit at the images' own resolution; where that would shrink the other stages'
    steps and the resolution is the dataset's (``image_size`` 0), measure and fit again at the
    smaller resolution at which they would fit (cost grows about with pixels), down to
    ``SMALLEST_AUTO_SIZE``. A run that cannot afford its images' size trains on smaller ones
    rather than on a tenth of its steps."""
    t0 = time.time()
    measured: dict[str, Any] = {}  # the timer of the first fit, for fitting again with fewer folds
    fit = _fit(pc, t0, device, measured)
    native = fit["image_size"]
    if fit["other_scale"] < 1.0 and _size_is_automatic(pc) and native > SMALLEST_AUTO_SIZE:
        fit = dict(_fit_smaller(pc, fit, t0, device), native_image_size=native)
    if fit["epochs"] < 1:
        fit = _fit_fewer_folds(pc, fit, t0, device, None if "native_image_size" in fit else measured)
    if fit["epochs"] < 1:
        raise C.ConfigError(
            f"budget_minutes={pc.budget_minutes:g} is too small here: the stages after pretraining take "
            f"about {fit['other_seconds'] / 60:.1f} min and one pretraining epoch {fit['epoch_seconds'] / 60:.1f} "
            "min; raise budget_minutes or shorten the other stages (min_steps, epochs, lr_search)")
    return fit


def _fit_smaller(pc: PipelineConfig, fit: dict[str, Any], t0: float, device: torch.device) -> dict[str, Any]:
    for _ in range(2):  # step costs do not fall quite as fast as pixels at small sizes
        target = fit["image_size"] * math.sqrt(fit["other_scale"])
        size = max(SMALLEST_AUTO_SIZE, int(target) // 8 * 8)
        if size >= fit["image_size"]:
            break
        fit = _fit(dataclasses.replace(pc, common=dict(pc.common, image_size=size)), t0, device)
        if fit["other_scale"] >= 1.0 or size == SMALLEST_AUTO_SIZE:
            break
    return fit


def _fit_fewer_folds(pc: PipelineConfig, fit: dict[str, Any], t0: float, device: torch.device, measured: dict[str, Any] | None) -> dict[str, Any]:
    """A cross-validated search (few labels) trains every rate once per fold, and the chosen rate
    again on every label. Where that leaves pretraining no epoch even with the other stages at
    ``MIN_SCALE``, fewer folds (down to 2) are tried before the budget is called too small; the
    number that fits is pinned in ``pipeline.yaml`` as ``cv_folds``, like the epochs."""
    from .search import search_modes

    folds = max((m.folds for m in search_modes(pc).values()), default=0)
    for k in range(folds - 1, 1, -1):
        fewer = dataclasses.replace(pc, cv_folds=k)
        if "native_image_size" in fit:
            fewer = dataclasses.replace(fewer, common=dict(fewer.common, image_size=fit["image_size"]))
        candidate = _fit(fewer, t0, device, measured)
        if candidate["epochs"] >= 1 or k == 2:
            kept = {key: fit[key] for key in ("native_image_size",) if key in fit}
            return dict(candidate, cv_folds=k, cv_folds_wanted=folds, **kept)
    return fit


def _size_is_automatic(pc: PipelineConfig) -> bool:
    """No section of ``pc`` sets ``image_size``: every stage trains at the dataset's own size."""
    sections = [v for k, v in vars(pc).items() if isinstance(v, dict) and k != "by_fraction"]
    sections += [v for f in pc.by_fraction.values() for v in f.values()]
    return not any(section.get("image_size") for section in sections)


def _fit(pc: PipelineConfig, t0: float, device: torch.device, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure on ``device`` (or, with ``reuse`` holding the timer of an earlier fit at the same
    resolution, reuse what was measured: fitting again with fewer folds must not spend the budget
    measuring) and fit."""
    plans = plan_stages(dataclasses.replace(pc, budget_minutes=0.0, pretrain=dict(pc.pretrain, epochs=1)))
    timer = (reuse or {}).get("timer") or _StepTimer(_Sizes(plans[0].cfg), device)
    if reuse is not None:
        reuse["timer"] = timer
    epoch = timer.pretrain_epoch(plans[0].cfg)
    parts = {plan.name: timer.stage(plan, plans[0].cfg) for plan in plans[1:]}  # (training, the rest)
    train, fixed = sum(t for t, _ in parts.values()), sum(f for _, f in parts.values())
    measured = time.time() - t0
    planned = pc.budget_minutes * 60 * (1 - MARGIN) - measured
    scale = 1.0
    if train + fixed > OTHER_SHARE * planned:
        scale = max(MIN_SCALE, (OTHER_SHARE * planned - fixed) / train)
    other = fixed + scale * train
    stages = {name: t * scale + f for name, (t, f) in parts.items()}
    left = planned - other
    epochs = math.floor(2 * left / epoch) / 2 if left > 0 else 0.0  # half epochs
    return {"budget_minutes": pc.budget_minutes, "epochs": epochs, "image_size": timer.image_size(plans[0].cfg),
            "epoch_seconds": round(epoch, 4),
            "other_seconds": round(other, 3), "other_scale": round(scale, 4), "measure_seconds": round(measured, 3),
            "other_train_seconds": round(train, 3), "other_fixed_seconds": round(fixed, 3),
            "stage_estimates": {k: round(v, 1) for k, v in stages.items()}}


class _Sizes:
    """Image counts of the splits the stages use (the validation split taken out)."""

    def __init__(self, cfg: Any) -> None:
        from .engine.batches import open_split
        from .engine.splits import has_test_split, training_pool, validation_indices

        t0 = time.perf_counter()
        ds, source = open_split(cfg, cfg.train_split, torch.device("cpu"))
        self.train, self.source = ds, source
        self.pool = len(training_pool(cfg, ds))
        self.val = len(validation_indices(cfg, ds))
        self.test = 0  # the few-labels layout may have no test split: nothing to evaluate there
        if has_test_split(cfg):
            test, _ = open_split(cfg, cfg.test_split, torch.device("cpu"))
            self.test = len(test)
        self.open = time.perf_counter() - t0  # every training run opens both splits
        self.channels = ds.channels
        # reading images: nothing for datasets held in memory, decoding for image folders
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:64]
        source.get(idx[:8])  # warm-up
        t0 = time.perf_counter()
        source.get(idx)
        self.load = (time.perf_counter() - t0) / len(idx)  # seconds per image

    def labelled(self, cfg: Any) -> int:
        from .engine.splits import labelled_indices

        return len(labelled_indices(cfg, self.train, None))

    def validation(self, cfg: Any) -> int:
        """Validation images of one run: the held-out split, or its fold (``val_folds``)."""
        from .engine.splits import validation_indices

        return len(validation_indices(cfg, self.train)) if cfg.val_folds else self.val


class _StepTimer:
    """Seconds per training step and per evaluated image, measured once per model and batch, on
    ``device`` (the training device: a run on a GPU is sized for the GPU's speed)."""

    def __init__(self, sizes: _Sizes, device: torch.device = CPU) -> None:
        from .engine.batches import image_size_of

        self.sizes, self.device = sizes, device
        self._image_size_of = image_size_of
        self._cache: dict[tuple[Any, ...], float] = {}

    def image_size(self, cfg: Any) -> int:
        return self._image_size_of(cfg, self.sizes.train)

    def _model(self, cfg: Any, **kw: Any) -> torch.nn.Module:
        from .engine.models import new_model

        size = self._image_size_of(cfg, self.sizes.train)
        model = new_model(cfg.model, self.sizes.train, size, cfg.stem, **kw).to(self.device)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model

    def _sync(self) -> None:
        """Wait for the device's queued work: CUDA kernels run after the call that launches them returns."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, key: tuple[Any, ...], fn: Any) -> float:
        if key not in self._cache:
            fn()  # warm-up: first-call allocations and kernel selection
            self._sync()
            times = []
            for _ in range(TIMED_STEPS):
                t0 = time.perf_counter()
                fn()
                self._sync()
                times.append(time.perf_counter() - t0)
            self._cache[key] = min(times)
        return self._cache[key]

    def _images(self, cfg: Any, n: int) -> torch.Tensor:
        size = self._image_size_of(cfg, self.sizes.train)
        return torch.randint(0, 256, (n, self.sizes.channels, size, size), dtype=torch.uint8).to(self.device)

    def pretrain_step(self, cfg: Any, batch: int) -> float:
        """One step of the pretraining stage's own loop body on ``batch`` images: its views
        (``engine.pretrain.contrastive_views``) and ``train_step``, on parts built as the stage
        builds them from ``cfg`` (model, head, probe, optimizer, memory, torch.compile, chunks), in
        the precision the stage would train in (``auto``: measured as the stage measures it)."""
        key = ("pretrain", batch, json.dumps(C.to_dict(cfg), sort_keys=True))
        if key in self._cache:
            return self._cache[key]
        return self._timed(key, _pretrain_step(cfg, self.sizes, batch, self.device))

    def classifier_step(self, cfg: Any, batch: int, teacher_cfg: Any = None) -> float:
        """One optimizer step of fine-tuning or the supervised baseline on ``batch`` images: their
        own step (``engine.classify.classifier_step``) with the stage's optimizer at lr 0 and its
        precision. With ``teacher_cfg``, a step of distillation: the forward pass of a frozen
        teacher (``teacher_cfg``'s model) and the student's step, a classifier's step standing in
        for the student's loss (the same passes; distillation keeps its own loop), plus the
        student's own view where ``student_view`` is ``strong``."""
        from .data.augment import CropFlipAugment
        from .engine.classify import classifier_step, training_view
        from .engine.device import grad_scaler
        from .engine.distill import student_augment
        from .optim import build_optimizer

        strong = teacher_cfg is not None and cfg.student_view != "same"  # auto: timed as strong, the dearer
        key = ("train", cfg.model, cfg.stem, batch, teacher_cfg and (teacher_cfg.model, teacher_cfg.stem),
               cfg.crop_min_scale, cfg.optimizer, cfg.precision, cfg.channels_last, strong,
               getattr(cfg, "color_strength", 0.0))
        if key in self._cache:
            return self._cache[key]
        size = self._image_size_of(cfg, self.sizes.train)
        # a classifier's own view (colour-distorted where it asks); distillation's teacher view
        aug = training_view(cfg, size) if teacher_cfg is None else CropFlipAugment(size, crop_scale=(cfg.crop_min_scale, 1.0))
        model = self._model(cfg, ft_proj_selector=0, num_classes=self.sizes.train.num_classes).train()
        teacher = self._model(teacher_cfg).eval() if teacher_cfg is not None else None
        opt = build_optimizer(cfg.optimizer, model, 0.0, cfg.weight_decay)
        scaler = grad_scaler(cfg.precision, self.device)
        x = self._images(cfg, batch)
        y = torch.randint(0, max(1, self.sizes.train.num_classes), (batch,), device=self.device)
        gen = torch.Generator(self.device).manual_seed(0)
        student_aug = student_augment(cfg, size, "strong") if strong else None

        def step() -> None:
            if teacher is not None:
                with torch.no_grad():
                    teacher(x.float() / 255)
            if student_aug is not None:
                student_aug(x, generator=torch.Generator().manual_seed(0))
            classifier_step(model, opt, scaler, aug, x, y, gen, precision=cfg.precision,
                            channels_last=cfg.channels_last)

        return self._timed(key, step)

    def per_image(self, cfg: Any) -> float:
        """Seconds per image of an evaluation forward pass (batches of 512), reading included."""
        key = ("eval", cfg.model, cfg.stem)
        if key in self._cache:
            return self._cache[key] / 512 + self.sizes.load
        model = self._model(cfg).eval()
        x = self._images(cfg, 512).float() / 255

        def forward() -> None:
            with torch.no_grad():
                model(x)

        return self._timed(key, forward) / 512 + self.sizes.load

    def pretrain_epoch(self, cfg: Any) -> float:
        batch = min(cfg.batch_size, self.sizes.pool)
        steps = max(1, self.sizes.pool // batch)
        seconds = steps * (self.pretrain_step(cfg, batch) + batch * self.sizes.load)
        if cfg.knn_every > 0:  # the kNN monitor: a bank of training images and the validation split
            images = min(cfg.knn_train_size or self.sizes.pool, self.sizes.pool)
            images += min(cfg.knn_test_size or self.sizes.val, self.sizes.val or self.sizes.test)
            seconds += images * self.per_image(cfg) / cfg.knn_every
        return seconds

    def stage(self, plan: Any, encoder: Any) -> tuple[float, float]:
        """Seconds of one stage after pretraining (all its search candidates): (its training steps,
        the rest); ``encoder`` is the pretraining config, whose model the teachers and probes run."""
        cfg, s = plan.cfg, self.sizes
        if plan.unscored:  # not run: nothing to score it on
            return 0.0, 0.0
        if plan.stage == "linear-eval":  # features of the labelled and test images (kNN reuses them)
            if plan.fold_plans:  # scored by folds (no test split): each fold extracts its own features
                return 0.0, sum(s.open + (s.labelled(f.cfg) + s.validation(f.cfg)) * self.per_image(encoder)
                                for f in plan.fold_plans)
            return 0.0, s.open + (s.labelled(cfg) + s.test) * self.per_image(encoder)
        if plan.stage == "knn-eval":
            return 0.0, 0.0
        # a search's candidates (cross-validated: rates x folds, then the chosen rate on every label)
        runs = [c.cfg for c in plan.candidates] + ([cfg] if plan.folds or not plan.candidates else [])
        if len(planned_rates(plan)) > 1:  # a rate beyond the grid, if its best is at an edge (its folds)
            runs += [c.cfg for c in plan.candidates[:max(1, plan.folds)]]
        from .engine.distill import rounds_for, student_view_for

        teacher = encoder if plan.stage == "distill" else None
        train, rest = 0.0, 0.0
        for run in runs:
            pool = s.pool if plan.stage == "distill" else s.labelled(run)
            batch = min(run.batch_size, pool)
            steps = max(math.ceil(run.epochs * max(1, pool // batch)), run.min_steps)
            rounds = 1
            if plan.stage == "distill":  # each round trains as long, and is scored (with its teacher) as the last
                rounds = rounds_for(run, student_view_for(run, steps * batch / pool))
                rest += (rounds - 1) * s.test * (self.per_image(run) + self.per_image(teacher))
            train += rounds * steps * (self.classifier_step(run, batch, teacher) + batch * s.load)
            rest += rounds * (s.open + s.validation(run) * self.per_image(run))
        rest += s.test * self.per_image(cfg)  # the test split, once: the chosen candidate
        if teacher is not None:  # the teacher is evaluated on the test split too
            rest += s.test * self.per_image(teacher)
        if plan.retry is not None:  # the baseline's search with colour-distorted views (pipeline.run_retry)
            more = self.stage(plan.retry, encoder)
            train, rest = train + more[0], rest + more[1]
        return train, rest


def _pretrain_step(cfg: Any, sizes: _Sizes, batch: int, device: torch.device) -> Callable[[], None]:
    """One step of ``engine.pretrain``'s loop body on random images of ``batch``, ready to time: the
    stage's parts from :func:`~simclrv2.engine.pretrain.build_parts`, its precision and gradient
    scaler, its views and ``train_step`` at learning rate 0. The parts are this step's own: nothing
    the run will train is touched."""
    from .engine import pretrain
    from .engine.device import grad_scaler, step_generator

    p = pretrain.build_parts(cfg, sizes.train, sizes.source, 0.0, device)
    views_shape = (2 * batch, sizes.channels, p.size, p.size)
    cfg, _ = pretrain.resolve_precision(cfg, Path(cfg.run_dir), p, views_shape, device, keep=False)
    scaler = grad_scaler(cfg.precision, device)
    # what the stage's batch source hands its loop: the stored images, or (streaming) both views' crops
    stored = views_shape if p.source.streams else (batch, *sizes.source.images.shape[1:])
    x = torch.randint(0, 256, stored, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    y = sizes.train.labels[torch.arange(batch) % len(sizes.train)].to(device)

    def step() -> None:
        views = pretrain.contrastive_views(cfg, p, x, step_generator(device, cfg.seed, 0))
        pretrain.train_step(cfg, p, views, y, 0.0, scaler)

    return step


def scale_stages(pc: PipelineConfig, scale: float) -> PipelineConfig:
    """``pc`` with the training length of every stage trained per label fraction (fine-tuning, the
    supervised baseline, distillation) times ``scale``: its
    ``min_steps`` and ``epochs`` (section values, else ``common``, else the stage's default), and
    those of ``by_fraction`` entries. ``scale`` 1 returns ``pc`` unchanged."""
    if scale >= 1.0:
        return pc

    def scaled(section: str, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        out = dict(values)
        for key, cast in (("min_steps", lambda v: max(1, round(v))), ("epochs", float)):
            base = values.get(key, defaults.get(key))
            if base is not None:
                out[key] = cast(base * scale)
        return out

    changes: dict[str, Any] = {}
    for section in FRACTION_SECTIONS:  # the stages trained per label fraction (Stage.per_fraction)
        cls = STAGES[SECTIONS[section]].config
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        defaults.update({k: v for k, v in pc.common.items() if k in ("min_steps", "epochs")})
        changes[section] = scaled(section, getattr(pc, section), defaults)
    by_fraction = {}
    for frac, sections in pc.by_fraction.items():
        by_fraction[frac] = {name: scaled(name, vals, {}) if name in FRACTION_SECTIONS else vals
                             for name, vals in sections.items()}
    return dataclasses.replace(pc, by_fraction=by_fraction, **changes)
