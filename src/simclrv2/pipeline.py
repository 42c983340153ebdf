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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import config as C
from . import distributed as dist
from . import runlock
from .checkpoint import atomic_write_text
from .engine.progress import position
from .plan import (
    FRACTION_SECTIONS,
    PipelineConfig,
    StagePlan,
    fold_candidates,
    plan_stages,
    planned_rates,
    rate_candidate,
)
from .stages import STAGES


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
    stage = STAGES[plan.stage]
    runner = stage.load_target()
    result = runner(cfg, test=test) if stage.takes_test else runner(cfg)
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


def run_search(plan: StagePlan, upstream: str | None) -> tuple[StagePlan, dict[str, Any], float, bool]:
    """Train every candidate of ``plan``, choose the best on the validation split, test only it.
    Where the best is the highest or the lowest rate of the grid, one more rate a grid step beyond
    that edge runs too, as in :func:`run_cv_search` (:func:`beyond_edge`): the demo's validation
    split once put fine-tuning at 0.1% labels 1.03 points higher a step below its grid.

    Returns (chosen candidate, its result with the search recorded, seconds of all candidates,
    whether everything was done before). Ties go to the smaller rate (:func:`best_rates`).
    """
    by_rate: dict[float, float] = {}
    runs: dict[float, tuple[float, StagePlan]] = {}  # rate: (training seconds, candidate)

    def record(cand: StagePlan, res: dict[str, Any], sec: float) -> dict[float, float]:
        by_rate[cand.cfg.base_lr] = res["val_top1"]
        runs[cand.cfg.base_lr] = (sec, cand)
        return by_rate

    seconds, all_skipped = _run_grid(plan, upstream, record, lambda lr: [rate_candidate(plan, lr)])
    assert by_rate, "a search plan has at least one candidate"
    trained, chosen = runs[best_rates(by_rate)[0]]
    result, sec, skipped = run_stage(chosen, upstream, test=True)
    seconds += sec - trained  # the chosen one's seconds include its training, counted above
    scores = {f"{lr:.4g}": v for lr, v in by_rate.items()}
    if dist.launch_rank() == 0:  # the stage folder stands for its choice: predict, export and friends read it
        atomic_write_text(Path(plan.cfg.run_dir) / "chosen.json", json.dumps({
            "chosen": Path(chosen.cfg.run_dir).name, "base_lr": chosen.cfg.base_lr, "val_top1": scores}, indent=1))
    result = dict(result, base_lr=chosen.cfg.base_lr, lr_search=scores, lr_at_edge=at_edge(by_rate),
                  lr_extended=len(by_rate) > len(planned_rates(plan)))
    return chosen, result, round(seconds, 2), all_skipped and skipped


def run_cv_search(plan: StagePlan, upstream: str | None) -> tuple[StagePlan, dict[str, Any], float, bool]:
    """Cross-validated search: every rate trains once per fold on the other folds and is scored on
    its fold; the rate with the best mean fold top-1 then trains on every label (and is tested).

    No fold's score comes from an image it trained on (``val_folds``: the fold is the validation
    split, the other folds the labelled subset). When the best rate is the highest or the lowest
    of the grid, the grid was centred for other data: one more rate, a grid step beyond that edge,
    runs its folds too, and the best of all is chosen (:func:`beyond_edge`). Returns what
    :func:`run_search` returns; the result's ``val_top1`` is the chosen rate's mean over folds,
    ``val_spread`` their standard deviation.
    """
    from .search import spread

    folds: dict[float, list[float]] = {}
    dirs: dict[float, list[str]] = {}
    images = 0  # validation images over every run

    def mean_scores() -> dict[float, float]:  # each rate's mean over its folds so far
        return {lr: sum(v) / len(v) for lr, v in folds.items()}

    def record(cand: StagePlan, res: dict[str, Any], sec: float) -> dict[float, float]:
        nonlocal images
        folds.setdefault(cand.cfg.base_lr, []).append(res["val_top1"])
        dirs.setdefault(cand.cfg.base_lr, []).append(cand.cfg.run_dir)
        images += res.get("val_images", 0)
        return mean_scores()

    seconds, all_skipped = _run_grid(plan, upstream, record, lambda lr: fold_candidates(plan, lr, plan.folds))
    means = mean_scores()
    best = best_rates(means)[0]  # ties: the smaller rate
    name = f"lr_{best:.4g}"
    final = dataclasses.replace(plan, name=f"{plan.name}/{name}", candidates=[], folds=0,
                                cfg=dataclasses.replace(plan.cfg, base_lr=best, run_dir=str(Path(plan.cfg.run_dir) / name)))
    result, sec, skipped = run_stage(final, upstream, test=True)
    seconds += sec
    rates = sorted(means)
    scores = {f"{lr:.4g}": round(means[lr], 4) for lr in rates}
    if dist.launch_rank() == 0:  # the stage folder stands for the run on every label
        atomic_write_text(Path(plan.cfg.run_dir) / "chosen.json", json.dumps({
            "chosen": name, "base_lr": best, "val_top1": scores,
            "folds": {f"{lr:.4g}": folds[lr] for lr in rates}}, indent=1))
    result = dict(result, base_lr=best, lr_search=scores, lr_at_edge=at_edge(means),
                  lr_extended=len(rates) > len(planned_rates(plan)),
                  val_top1=round(means[best], 4), val_spread=round(spread(folds[best]), 4),
                  val_images=images // len(rates), folds=plan.folds, fold_dirs=dirs[best])
    return final, result, round(seconds, 2), all_skipped and skipped


def _run_grid(plan: StagePlan, upstream: str | None,
              record: Callable[[StagePlan, dict[str, Any], float], dict[float, float]],
              beyond: Callable[[float], list[StagePlan]]) -> tuple[float, bool]:
    """A search's runs, none tested: ``plan``'s candidates, then, where the scores by rate that
    ``record`` returns after them put the best at an untied edge, the runs ``beyond`` gives for one
    rate a grid step past it (:func:`beyond_edge`). ``record`` takes each run's candidate, result
    and seconds. Returns (seconds of every run, whether all were done before)."""
    seconds, all_skipped, scores = 0.0, True, {}
    candidates = list(plan.candidates)
    while candidates:
        for cand in candidates:
            res, sec, skipped = run_stage(cand, upstream, test=False)
            seconds += sec
            all_skipped &= skipped
            scores = record(cand, res, sec)
        extra = beyond_edge(plan, scores)
        candidates = beyond(extra) if extra is not None else []
    return seconds, all_skipped


# Mean fold scores this close (in points) are a tie. Each fold's top-1 comes rounded to 4 decimals,
# so two rates right on as many images of each fold can differ by up to 5e-5 in their means (on
# held-out shapes, 6 images a fold: 16.666675 against 16.6667); one image more on a fold of n
# images moves the mean of k folds by 100 / (n k) points, more than this while n k < 100,000.
TIE_POINTS = 1e-3


def best_rates(scores: dict[float, float]) -> list[float]:
    """The rates whose score ties the best (within :data:`TIE_POINTS`), smallest first."""
    top = max(scores.values())
    return sorted(lr for lr, v in scores.items() if v >= top - TIE_POINTS)


def at_edge(scores: dict[float, float]) -> bool:
    """Whether a search's best rate is its lowest or its highest and better than every other rate:
    the one case where the data point beyond the grid. A tie (common with 10 images a fold, and
    broken towards the smaller rate) says nothing of a direction. ``results.json`` records it as
    ``lr_at_edge``; the report's advice to widen ``lr_search`` reads it."""
    best = best_rates(scores)
    return len(scores) > 1 and len(best) == 1 and best[0] in (min(scores), max(scores))


def beyond_edge(plan: StagePlan, means: dict[float, float]) -> float | None:
    """The one rate a cross-validated search adds when its best mean is at an edge of the planned
    grid (:func:`at_edge`): a grid step (the ratio of the two rates at that edge) beyond it. None
    otherwise, when the grid has one rate, or when the search has already gone beyond it once."""
    planned = planned_rates(plan)
    if len(planned) < 2 or len(means) > len(planned) or not at_edge(means):
        return None
    best = max(means, key=means.__getitem__)
    return best * (planned[-1] / planned[-2] if best == planned[-1] else planned[0] / planned[1])


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


# A search "learned" where its best rate beats chance at this level on its held-out labels, the
# chance of so good a best among its rates counted (Bonferroni), and by CHANCE_MARGIN points
LEARNED_P = 0.05


def chance_test(result: dict[str, Any]) -> dict[str, float] | None:
    """How a search's best held-out score compares with chance (one in ``num_classes``): chance, the
    best score, the images it was scored on, and the one-sided binomial p-value of so many right or
    more by chance, times the number of rates tried. None without ``num_classes`` or images.

    Held-out shapes (docs/EXPERIMENTS.md): 7 of 24 fold images right (29.17) is no evidence
    against a chance of one in six (p = 0.09 for one rate, 0.27 for the best of three)."""
    from scipy.stats import binomtest

    classes, images = result.get("num_classes"), result.get("val_images") or 0
    if not classes or not images:
        return None
    scores = result["lr_search"].values()
    best = max(scores)
    right = round(best * images / 100.0)
    p = binomtest(right, images, 1.0 / classes, alternative="greater").pvalue
    return {"chance": round(100.0 / classes, 4), "best": best, "images": images,
            "p_value": round(min(1.0, p * len(scores)), 4)}


def learned_nothing(result: dict[str, Any]) -> bool:
    """Whether no rate of a search scored clear of chance on its held-out labels: by less than the
    report's CHANCE_MARGIN points, or by a margin chance alone would often give (:func:`chance_test`)."""
    from .report import near_chance

    test = chance_test(result)
    return bool(test is not None and (near_chance(result, test["best"]) or test["p_value"] >= LEARNED_P))


def run_retry(plan: StagePlan, first: tuple[StagePlan, dict[str, Any], float, bool], upstream: str | None,
              search: Any) -> tuple[StagePlan, dict[str, Any], float, bool]:
    """The search of ``plan.retry`` (colour-distorted views) after ``first``, the result of ``plan``'s
    search (crops and flips). The retry's best rate is kept only where its held-out score beats the
    first search's (ties keep crops and flips); ``color_retry`` in the result records both, the
    first one's :func:`chance_test`, and whether the one kept learned anything. Returns
    what :func:`run_search` returns, the seconds of both searches together; ``search`` is the
    search function of ``first`` (:func:`run_search` or :func:`run_cv_search`)."""
    assert plan.retry is not None
    chosen, result, seconds, skipped = first
    r_chosen, r_result, r_seconds, r_skipped = search(plan.retry, upstream)
    before, after = max(result["lr_search"].values()), max(r_result["lr_search"].values())
    won = after > before + TIE_POINTS
    test = chance_test(result) or {}
    record = {"color_strength": plan.retry.cfg.color_strength, "best_without": before, "best_with": after,
              "kept": won, "lr_search": r_result["lr_search"],
              **{k: test[k] for k in ("chance", "images", "p_value") if k in test}}
    if won:
        chosen, result = r_chosen, r_result
        if dist.launch_rank() == 0:  # the stage folder now stands for the coloured run
            retry_dir = Path(plan.retry.cfg.run_dir)
            rec = json.loads((retry_dir / "chosen.json").read_text())
            rec = dict(rec, chosen=f"{retry_dir.name}/{rec['chosen']}", color_strength=record["color_strength"])
            atomic_write_text(Path(plan.cfg.run_dir) / "chosen.json", json.dumps(rec, indent=1))
    record["learned_nothing"] = learned_nothing(result)  # of the search kept: the report names it as a cause
    return chosen, dict(result, color_retry=record), round(seconds + r_seconds, 2), skipped and r_skipped


def _run_plan(plan: StagePlan, upstream: str | None) -> tuple[dict[str, Any], float, bool, str]:
    """One planned stage, its search or its folds; (result, seconds, skipped, the folder that stands for it)."""
    if plan.candidates:
        search = run_cv_search if plan.folds else run_search
        searched = search(plan, upstream)
        if plan.retry is not None:
            searched = run_retry(plan, searched, upstream, search)
        chosen, result, seconds, skipped = searched
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
    from .budget import fit_pretraining

    budget = fit_pretraining(pc, device)
    return _budgeted(pc, budget, budget.get("regrown_scale", budget.get("other_scale", 1.0))), budget


def _budgeted(pc: PipelineConfig, budget: dict[str, Any], scale: float) -> PipelineConfig:
    """``pc`` (with its ``budget_minutes``) as ``budget`` sized it: pretraining's epochs, the later
    stages' steps times ``scale``, and the image size and folds where those did not fit."""
    from .budget import scale_stages

    pc = dataclasses.replace(scale_stages(pc, scale), budget_minutes=0.0, pretrain=dict(pc.pretrain, epochs=budget["epochs"]))
    if "native_image_size" in budget:  # the images' own size did not fit; pinned like the epochs
        pc = dataclasses.replace(pc, common=dict(pc.common, image_size=budget["image_size"]))
    if "cv_folds" in budget:  # the search's folds did not fit; fewer, pinned like the epochs
        pc = dataclasses.replace(pc, cv_folds=budget["cv_folds"])
    return pc


def _regrow(given: PipelineConfig, budget: dict[str, Any], started: float, plan: StagePlan,
            result: dict[str, Any], seconds: float, skipped: bool) -> PipelineConfig | None:
    """After pretraining: ``given`` (the command's config) with the later stages' steps that the time
    left affords (:func:`~simclrv2.budget.regrown_scale`), pinned in ``budget.json`` so that a rerun
    repeats them; None where they keep the scale they have. Rank 0 decides, every rank follows."""
    from .budget import pin, regrown_scale

    scale = None
    # a pretraining done before, or resumed, has no pace to go by: its seconds are not its epochs'
    if "regrown_scale" not in budget and dist.launch_rank() == 0 and not skipped and not result.get("resumed_at"):
        epochs = result.get("shortened", {}).get("epochs", plan.cfg.epochs)
        pace = seconds / max(1e-9, epochs * budget["epoch_seconds"])
        scale = regrown_scale(budget, started, time.time(), pace)
        if scale is not None:
            pin(given.run_dir, dict(budget, regrown_scale=scale))
            print(f"budget: pretraining ran at {pace:.2f} times its estimate; the later stages get "
                  f"{scale:.0%} of their steps, not {budget['other_scale']:.0%}", flush=True)
    scale = dist.broadcast_object(scale)
    if scale is None:
        return None
    budget["regrown_scale"] = scale
    return _budgeted(given, budget, scale)


def run_pipeline(pc: PipelineConfig) -> dict[str, Any]:
    from .budget import deadline as budget_deadline
    from .engine.deadline import pretraining_deadline
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
    started = time.time()
    given = pc
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
    probes = [i for i, p in enumerate(plans, 1) if STAGES[p.stage].probe]
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
            end = budget_deadline(budget, started) if budget is not None and plan.stage == "pretrain" else None
            with position(f"[{i}/{len(plans)}] {plan.name}"), pretraining_deadline(end):  # where the bar or lines are
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
                pretrained = _pretrained(plan, result, out_dir)
                grown = _regrow(given, budget, started, plan, result, seconds, skipped) if budget else None
                if grown is not None:  # pretraining ended ahead of the estimate: the later stages get the time
                    pc = grown
                    plans[i:] = plan_stages(pc)[i:]  # the same stages, longer (the loop reads the list as it goes)
                    if dist.launch_rank() == 0:
                        atomic_write_text(run_dir / "pipeline.yaml", C.dump_yaml(dataclasses.asdict(pc)))
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


def _pretrained(plan: StagePlan, result: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """What results.json and the report say of pretraining."""
    from .report import knn_curve, knn_first_half, pretraining_metrics

    # whether the monitor still rose over the second half: the report's advice on length
    early = knn_first_half(knn_curve(pretraining_metrics(Path(out_dir)))) if out_dir else None
    pretrained = {"epochs": plan.cfg.epochs, "steps": result.get("steps"),
                  "knn_top1": result.get("knn_top1"), "knn_first_half": early}
    if "shortened" in result:  # the deadline cut it: the epochs it ran
        pretrained.update(epochs=round(result["shortened"]["epochs"], 2), planned_epochs=plan.cfg.epochs)
    return pretrained


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
        "model": pretrain.cfg.model if STAGES[plan.stage].probe else plan.cfg.model,
        "top1": result.get("top1"), "top5": result.get("top5"), "seconds": seconds, "run_dir": out_dir,
        "num_classes": len(result.get("per_class_accuracy", [])) or _num_classes(result, plan) or None,
        "steps": result.get("steps"),
    }
    for key in ("val_top1", "base_lr", "lr_search", "lr_at_edge", "lr_extended", "teacher_top1", "teacher_agreement",
                "student_view", "passes", "rounds", "earlier_rounds", "rate_choice", "folds", "fold_dirs", "unscored",
                "color_retry"):
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
