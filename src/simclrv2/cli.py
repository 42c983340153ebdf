"""``simclrv2 <stage> --config FILE [key=value ...]``: thin wiring from the command line to the stages."""

from __future__ import annotations

import argparse
import os
import sys

from . import config as C
from .config import parse_tool_args  # the grammar of every command; re-exported for the tools' callers
from .stages import STAGES, load_target

# the commands that are not stages (those are simclrv2.stages.STAGES): (module:function, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "pipeline": ("simclrv2.pipeline:main", "run every stage and write results.json, report.md and plots"),
    "models": ("simclrv2.cli:_models_main", "list the model registry"),
    "convert": ("simclrv2.convert_command:main", "convert a released SimCLRv2 TF1 checkpoint"),
    "predict": ("simclrv2.serve:predict_main", "classes and probabilities for images or a dataset split"),
    "embed": ("simclrv2.serve:embed_main", "write features of a split to .npy"),
    "select": ("simclrv2.select:select_main", "choose the images of an unlabeled folder to label first"),
    "export": ("simclrv2.serve:export_main", "export encoder + classifier to ONNX or TorchScript"),
}


def _models_main(argv: list[str]) -> int:
    parse_tool_args(argparse.ArgumentParser(prog="simclrv2 models", description="List every registered model variant."),
                    argv)
    from .models.registry import format_models_table

    print(format_models_table())
    return 0


def _stage_main(stage: str, argv: list[str]) -> int:
    cls = STAGES[stage].config
    parser = argparse.ArgumentParser(
        prog=f"simclrv2 {stage}",
        description=f"{STAGES[stage].help}.\n\nConfig keys (key = default); override any with key=value, "
        "dotted for nested sections:\n" + C.describe(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with config keys (a pipeline config is not accepted here)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=10 memory.enabled=true")
    args = parser.parse_args(argv)
    cfg = C.load_config(cls, args.config, args.overrides, stage=stage)
    result = STAGES[stage].load_target()(cfg)
    from . import distributed as dist

    if dist.is_main() and isinstance(result, dict):
        shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "n"}
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
    dist.cleanup_distributed()
    return 0


def _friendly_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .data.images import DatasetError
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
    names = {**{name: s.help for name, s in STAGES.items()}, **{name: text for name, (_, text) in TOOLS.items()}}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: simclrv2 <command> [--config FILE] [key=value ...]\n\ncommands:")
        for name, text in names.items():
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
        return int(load_target(TOOLS[cmd][0])(rest) or 0)
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
