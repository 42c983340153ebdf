"""``simclrv2 <stage> --config FILE [key=value ...]``: thin wiring from the command line to the stages."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import config as C

STAGES: dict[str, tuple[str, str]] = {
    # stage: (module:function, one-line help)
    "pretrain": ("simclrv2.engine.pretrain:run", "contrastive pretraining (NT-Xent, LARS, optional memory queue)"),
    "finetune": ("simclrv2.engine.finetune:run", "fine-tune from a projection-head layer on a labelled subset"),
    "supervised": ("simclrv2.engine.supervised:run", "supervised baseline from random init on the same labels"),
    "distill": ("simclrv2.engine.distill:run", "distil a fine-tuned teacher into a student on unlabeled images"),
    "linear-eval": ("simclrv2.engine.probe:run_linear_eval", "linear classifier on frozen features"),
    "knn-eval": ("simclrv2.engine.probe:run_knn_eval", "weighted kNN on frozen features"),
}
TOOLS: dict[str, tuple[str, str]] = {
    "pipeline": ("simclrv2.pipeline:main", "run every stage and write results.json, report.md and plots"),
    "models": ("simclrv2.cli:_models_main", "list the model registry"),
    "convert": ("simclrv2.convert:convert_main", "convert a released SimCLRv2 TF1 checkpoint"),
    "predict": ("simclrv2.serve:predict_main", "classes and probabilities for images or a dataset split"),
    "embed": ("simclrv2.serve:embed_main", "write features of a split to .npy"),
    "select": ("simclrv2.select:select_main", "choose the images of an unlabeled folder to label first"),
    "export": ("simclrv2.serve:export_main", "export encoder + classifier to ONNX or TorchScript"),
}


_KEY_VALUE = re.compile(r"([A-Za-z_][\w-]*)=(.*)", re.S)


def parse_tool_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The grammar of every command for a tool's argparse ``parser``: ``--config FILE`` (YAML of
    key: value) and ``key=value``, the key being an option's name with underscores
    (``tf_checkpoint=DIR`` for ``--tf-checkpoint DIR``, ``verify=true`` for a switch). The old
    ``--flags`` still parse, with one deprecation line on stderr. A bad key or a missing one is a
    :class:`~simclrv2.config.ConfigError` in key=value words."""
    argv = list(sys.argv[1:] if argv is None else argv)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    flags = {opt: a for a in actions.values() for opt in a.option_strings}
    _describe_keys(parser, actions)
    settings: list[tuple[str, Any]] = []  # (key, value) from --config, then from the command line
    passed: list[str] = []  # tokens argparse reads as they are: old flags with their values, positionals
    old: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config" or tok.startswith("--config="):
            path = tok.partition("=")[2] if "=" in tok else (argv[i + 1] if i + 1 < len(argv) else "")
            if not path:
                raise C.ConfigError(f"{parser.prog}: --config needs a YAML file, e.g. --config options.yaml")
            settings[:0] = [(k, v) for k, v in C.load_yaml(path).items()]  # the command line wins
            i += 1 if "=" in tok else 2
            continue
        match = _KEY_VALUE.fullmatch(tok)
        if match and not tok.startswith("-"):
            settings.append((match.group(1), match.group(2)))  # the text as typed: a path stays a path
            i += 1
            continue
        flag = tok.partition("=")[0]
        if flag in flags and flag not in ("-h", "--help"):
            old.append(flag)
            takes_value = flags[flag].nargs != 0 and "=" not in tok
            passed += argv[i : i + 1 + takes_value]  # a flag's value (maybe "a=b") is not a key=value
            i += 1 + takes_value
            continue
        passed.append(tok)
        i += 1
    tokens = []
    for key, value in settings:
        action = actions.get(key.replace("-", "_"))
        if action is None and not actions:
            raise C.ConfigError(f"{parser.prog} takes no options, got '{key}'")
        if action is None:
            raise C.unknown_key(key, list(actions))
        tokens += _as_tokens(parser.prog, key, value, action)
    if old:
        spelled = ", ".join(f"{f} -> {flags[f].dest}=..." for f in dict.fromkeys(old))
        print(f"note: {parser.prog}: the --flags are deprecated and go in the next release; write key=value "
              f"({spelled})", file=sys.stderr)

    def error(message: str) -> None:
        for opt, action in sorted(flags.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(opt, action.dest)
        raise C.ConfigError(f"{parser.prog}: {message}; options are key=value, see --help")

    parser.error = error  # type: ignore[method-assign]  # argparse's usage-and-exit, as one line
    return parser.parse_args(tokens + passed)


def _as_tokens(prog: str, key: str, value: Any, action: argparse.Action) -> list[str]:
    """``key=value`` as the argparse tokens of ``action``."""
    if action.nargs == 0:  # a switch (store_true / store_false)
        value = C.parse_value(value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise C.ConfigError(f"{prog}: '{key}' must be true or false, got {value!r}")
        on = value != bool(action.default)
        return [action.option_strings[0]] if on else []
    if value is None:
        return []
    text = value if isinstance(value, str) else str(value)
    if not action.option_strings:  # a positional named by its key
        return [text]
    return [f"{action.option_strings[0]}={text}"]  # one token, so a value such as -1 is not a flag


def _describe_keys(parser: argparse.ArgumentParser, actions: dict[str, argparse.Action]) -> None:
    """--help ends with the key=value spelling of every option; argparse's list keeps the old flags."""
    if parser.usage is not None:
        return
    parser.usage = f"{parser.prog} [--config FILE] key=value ..."
    lines = []
    for key, a in actions.items():
        if a.nargs == 0:
            value = "true|false"
        elif a.choices:
            value = "|".join(map(str, a.choices))
        else:
            value = a.metavar or key.upper()
        default = "" if a.required or a.default in (None, "", False) else f" (default: {a.default})"
        lines.append(f"  {key}={value}{default}" + (" [required]" if a.required else ""))
    keys = "\nkeys (key=value, or key: value in a --config YAML file):\n" + "\n".join(lines)
    keys += "\nThe --flags above are the old spelling of the same keys, kept for this release.\n"
    help_text = parser.format_help
    parser.format_help = lambda: help_text() + keys  # type: ignore[method-assign]


def _load(target: str) -> Callable[..., Any]:
    import importlib

    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _models_main(argv: list[str]) -> int:
    parse_tool_args(argparse.ArgumentParser(prog="simclrv2 models", description="List every registered model variant."),
                    argv)
    from .models.registry import format_models_table

    print(format_models_table())
    return 0


def _stage_main(stage: str, argv: list[str]) -> int:
    cls = C.STAGE_CONFIGS[stage]
    parser = argparse.ArgumentParser(
        prog=f"simclrv2 {stage}",
        description=f"{STAGES[stage][1]}.\n\nConfig keys (key = default); override any with key=value, "
        "dotted for nested sections:\n" + C.describe(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with config keys (a pipeline config is not accepted here)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 memory.enabled=true")
    args = parser.parse_args(argv)
    cfg = C.load_config(cls, args.config, args.overrides, stage=stage)
    result = _load(STAGES[stage][0])(cfg)
    from . import distributed as dist

    if dist.is_main() and isinstance(result, dict):
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "n"}
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
    dist.cleanup_distributed()
    return 0


def _friendly_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data.datasets import DatasetError
    from .distributed import DeviceMismatchError
    from .engine.runfolder import RunError
    from .released import DownloadError
    from .runlock import RunFolderBusy

    return (C.ConfigError, RunError, RunFolderBusy, CheckpointError, DatasetError, DownloadError, ValueError,
            DeviceMismatchError,
            FileNotFoundError, PermissionError)


def error_line(e: BaseException) -> str:
    """The one line shown for a known error.

    An error raised in a DataLoader worker reaches us re-raised as "Caught DatasetError in
    DataLoader worker process 0." followed by the worker's traceback; its last line holds the
    original message (the one that names the file).
    """
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        last = lines[-1]
        name, sep, msg = last.partition(": ")
        return msg if sep and name.rsplit(".", 1)[-1] == type(e).__name__ else last
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = {**STAGES, **TOOLS}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: simclrv2 <command> [--config FILE] [key=value ...]\n\ncommands:")
        for name, (_, text) in names.items():
            print(f"  {name:<12} {text}")
        print("\n`simclrv2 <command> --help` shows every option with its default. Under torchrun use "
              "`python -m simclrv2 <command> ...`.")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in names:
        print(f"error: unknown command '{cmd}'; valid commands: {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        if cmd in STAGES:
            return _stage_main(cmd, rest)
        return int(_load(TOOLS[cmd][0])(rest) or 0)
    except _friendly_errors() as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        if os.environ.get("SIMCLRV2_TRACEBACK"):
            raise
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept and the run resumes from it", file=sys.stderr)
        return 130
    finally:
        # the run folders this command wrote are free again (a SIGKILL leaves a stale lock instead,
        # which the next run takes over)
        from .runlock import release_all

        release_all()


if __name__ == "__main__":
    sys.exit(main())
