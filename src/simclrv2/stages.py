"""The stage table: every training and evaluation stage, its config, its runner and its place in the pipeline.

One :class:`Stage` record per stage, in the order the CLI lists them. ``cli`` maps commands to
them, ``plan`` builds each stage's config from the pipeline's sections, ``pipeline`` runs them and
``budget`` scales their lengths; none of them keeps a list of stages of its own. A runner is named
by a ``"module:function"`` string and imported only when it runs (:func:`load_target`), so this
table, like ``config``, loads no engine code and no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import config as C


def load_target(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names, its module imported now."""
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


@dataclass(frozen=True)
class Stage:
    """One stage: what the CLI, the pipeline's plan and the budget need to know of it."""

    name: str  # the command (`simclrv2 <name>`) and ``stage`` in a run folder's config.yaml
    config: type  # its typed config (simclrv2.config)
    runner: str  # "module:function" that runs it on a config and returns its result dict
    help: str  # one line for `simclrv2 --help`
    sections: tuple[str, ...]  # the PipelineConfig sections that hold its keys
    lr_search: bool = False  # the pipeline's lr_search trains it once per rate, chosen on validation
    takes_test: bool = False  # its runner takes ``test=``: False evaluates on the validation split only
    probe: bool = False  # evaluates the pretrained encoder: shares its features, reports its model
    # trained once per label fraction: its sections may appear under by_fraction.<f>, and a budget
    # too small for them shrinks their steps (budget.scale_stages)
    per_fraction: bool = False

    def load_target(self) -> Callable[..., Any]:
        """The runner, imported now."""
        return load_target(self.runner)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", C.PretrainConfig, "simclrv2.engine.pretrain:run",
          "contrastive pretraining (NT-Xent, LARS, optional memory queue)", ("pretrain",)),
    Stage("finetune", C.FinetuneConfig, "simclrv2.engine.finetune:run",
          "fine-tune from a projection-head layer on a labelled subset", ("finetune",),
          lr_search=True, takes_test=True, per_fraction=True),
    Stage("supervised", C.SupervisedConfig, "simclrv2.engine.supervised:run",
          "supervised baseline from random init on the same labels", ("supervised",),
          lr_search=True, takes_test=True, per_fraction=True),
    Stage("distill", C.DistillConfig, "simclrv2.engine.distill:run",
          "distil a fine-tuned teacher into a student on unlabeled images", ("distill_self", "distill_small"),
          takes_test=True, per_fraction=True),
    Stage("linear-eval", C.LinearEvalConfig, "simclrv2.engine.probe:run_linear_eval",
          "linear classifier on frozen features", ("linear_eval",), probe=True),
    Stage("knn-eval", C.KnnEvalConfig, "simclrv2.engine.probe:run_knn_eval",
          "weighted kNN on frozen features", ("knn_eval",), probe=True),
)}
