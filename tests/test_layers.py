"""The package's layers (DESIGN.md "Layers"): what each module may load, and no import cycle.

Two views of the same rules. A fresh interpreter imports the layers bottom-up and, after each,
checks ``sys.modules`` for what that layer must not have loaded: what a user pays for an import.
The import graph read from the source (every ``import``, also those inside functions, which run
later; ``if TYPE_CHECKING:`` blocks excepted) must have no cycle, and no layer may reach a
forbidden module through it, however late the import runs.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import simclrv2

PACKAGE = Path(simclrv2.__file__).parent
OURS = "simclrv2."  # a rule's "*": every module of ours but the layer itself

APPS = ("simclrv2.cli", "simclrv2.pipeline", "simclrv2.budget", "simclrv2.plan", "simclrv2.search",
        "simclrv2.serve", "simclrv2.select", "simclrv2.labelling", "simclrv2.report", "simclrv2.pretrained",
        "simclrv2.convert_command")
LIBRARY = ("simclrv2.engine", "simclrv2.data", "simclrv2.cli", "simclrv2.convert", "simclrv2.released",
           "simclrv2.pretrained", "simclrv2.pipeline", "simclrv2.modelfile", "simclrv2.convert_command")

# Inside data, the datasets build bottom-up: images <- base <- builtin, folder (<- index) <- datasets,
# the entry point. Each of these may import only the data modules named with it (images: any).
DATA_MODULES = ("base", "builtin", "folder", "datasets", "index", "subsets", "augment", "decode")


def _data_except(*allowed: str) -> tuple[str, ...]:
    return tuple(f"simclrv2.data.{m}" for m in DATA_MODULES if m not in allowed)


STAGES = ("pretrain", "finetune", "supervised", "distill", "probe")  # the engine's stage modules
# the engine's shared modules, bottom-up: below the stages and classify, so they import neither
ENGINE_PARTS = ("progress", "runfolder", "gradcache", "device", "batches", "splits", "models", "checkpointer",
                "metrics", "evaluate", "labels")

# layer: the modules (or packages, by prefix) it must not load or import, even late. "torch" is
# checked in the fresh interpreter only: a layer that names it loads no torch when imported.
RULES: dict[str, tuple[str, ...]] = {
    "simclrv2.host": (OURS, "torch"),
    "simclrv2.data.images": (OURS,),
    "simclrv2.data.base": _data_except("base"),
    "simclrv2.data.builtin": _data_except("builtin", "base"),
    "simclrv2.data.folder": _data_except("folder", "base", "index"),
    "simclrv2.data.datasets": _data_except("datasets", "base", "builtin", "folder", "index"),
    "simclrv2.runlock": (OURS,),
    "simclrv2.tfcheckpoint": (OURS,),
    "simclrv2.selection": (OURS,),
    "simclrv2.released": ("simclrv2.convert", "simclrv2.pretrained", "simclrv2.models", "simclrv2.data",
                          "simclrv2.engine", "simclrv2.cli", "simclrv2.modelfile", "simclrv2.convert_command",
                          "torch"),
    "simclrv2.config": ("simclrv2.cli", "simclrv2.engine", "simclrv2.data", "simclrv2.convert", "torch"),
    "simclrv2.stages": ("simclrv2.cli", "simclrv2.engine", "simclrv2.data", "simclrv2.convert", "simclrv2.plan",
                        "simclrv2.pipeline", "simclrv2.budget", "torch"),
    "simclrv2.plan": ("simclrv2.pipeline", "simclrv2.budget", "simclrv2.engine", "simclrv2.cli", "torch"),
    # below the engine and the tools (plan imports it inside plan_stages; the reverse would be a cycle)
    "simclrv2.search": ("simclrv2.engine", *(app for app in APPS if app not in ("simclrv2.search", "simclrv2.plan"))),
    "simclrv2.data": ("simclrv2.convert", "simclrv2.released", "simclrv2.pretrained", "simclrv2.cli",
                      "simclrv2.engine", "simclrv2.models", "simclrv2.modelfile", *APPS[1:]),
    "simclrv2.distributed": LIBRARY,
    "simclrv2.checkpoint": LIBRARY,
    "simclrv2.models": LIBRARY,
    "simclrv2.losses": LIBRARY,
    "simclrv2.optim": LIBRARY,
    "simclrv2.memory": LIBRARY,
    # model files: read by the stages and tools, written by convert_command; below both
    "simclrv2.modelfile": (*APPS, "simclrv2.engine", "simclrv2.data", "simclrv2.convert", "simclrv2.released"),
    # the TF -> torch mapping only: no download, not the command (modelfile writes its files)
    "simclrv2.convert": ("simclrv2.cli", "simclrv2.engine", "simclrv2.data", "simclrv2.pretrained",
                         "simclrv2.pipeline", "simclrv2.convert_command", "simclrv2.released"),
    # `simclrv2 convert`: pretrained uses it, it uses no tool (nor pretrained: that would be a cycle)
    "simclrv2.convert_command": (*(app for app in APPS if app != "simclrv2.convert_command"), "simclrv2.engine",
                                 "simclrv2.data"),
    **{f"simclrv2.engine.{stage}": (*APPS, "simclrv2.convert", "simclrv2.released")
       for stage in STAGES},
    **{f"simclrv2.engine.{part}": (*APPS, "simclrv2.convert", "simclrv2.released", "simclrv2.engine.classify",
                                   *(f"simclrv2.engine.{stage}" for stage in STAGES))
       for part in ENGINE_PARTS},
    # the classifier stages' shared loop: below them, so it imports none of them
    "simclrv2.engine.classify": (*APPS, "simclrv2.convert", "simclrv2.released",
                                 *(f"simclrv2.engine.{stage}" for stage in STAGES)),
    "simclrv2.budget": ("simclrv2.pipeline", "simclrv2.cli"),
    **{app: ("simclrv2.cli",) for app in APPS[1:]
       if app not in ("simclrv2.budget", "simclrv2.plan", "simclrv2.search", "simclrv2.convert_command")},
}

# Each group runs in one fresh interpreter, lowest layer first: a layer is checked before anything
# above it is imported, so what is loaded then is what it and the layers below it loaded.
GROUPS = {
    "bottom": ["simclrv2.host", "simclrv2.released", "simclrv2.config", "simclrv2.stages", "simclrv2.plan",
               "simclrv2.search"],
    "data": ["simclrv2.data"],
    "library": ["simclrv2.distributed", "simclrv2.checkpoint", "simclrv2.models", "simclrv2.losses",
                "simclrv2.optim", "simclrv2.memory", "simclrv2.modelfile", "simclrv2.convert",
                "simclrv2.convert_command"],
    "engine and tools": [*(f"simclrv2.engine.{p}" for p in ENGINE_PARTS), "simclrv2.engine.classify",
                         *(f"simclrv2.engine.{s}" for s in STAGES), "simclrv2.budget", "simclrv2.report", "simclrv2.labelling",
                         "simclrv2.serve", "simclrv2.select", "simclrv2.pretrained", "simclrv2.pipeline"],
}

_CHECK = """
import importlib, json, sys
found = {}
for layer, forbidden in json.loads(sys.argv[1]):
    try:
        importlib.import_module(layer)
    except ImportError as e:
        found[layer] = str(e)
        continue
    loaded = {m if f == "simclrv2." else f for m in sys.modules for f in forbidden
              if ((m.startswith("simclrv2.") and not (layer == m or layer.startswith(m + ".") or m.startswith(layer + ".")))
                  if f == "simclrv2." else (m == f or m.startswith(f + ".")))}
    if loaded:
        found[layer] = sorted(loaded)
print(json.dumps(found))
"""


def _forbids(forbidden: str, layer: str, module: str) -> bool:
    if forbidden == OURS:  # a package's own parents and children are the layer itself
        return not (module == "simclrv2" or module == layer or layer.startswith(module + ".")
                    or module.startswith(layer + "."))
    return module == forbidden or module.startswith(forbidden + ".")


@pytest.fixture(scope="module")
def loaded() -> Iterator[dict[str, subprocess.Popen]]:
    """One fresh interpreter per group, all started at once (each imports torch: seconds)."""
    procs = {group: subprocess.Popen([sys.executable, "-c", _CHECK, json.dumps([(la, RULES[la]) for la in layers])],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for group, layers in GROUPS.items()}
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("group", list(GROUPS))
def test_a_layer_loads_nothing_above_it(group: str, loaded: dict[str, subprocess.Popen]) -> None:
    out, err = loaded[group].communicate(timeout=300)
    assert loaded[group].returncode == 0, err
    assert json.loads(out) == {}, f"a layer loaded what DESIGN.md 'Layers' forbids it: {out}"


def test_every_rule_is_checked_in_a_fresh_interpreter_or_by_source_only() -> None:
    grouped = {layer for layers in GROUPS.values() for layer in layers}
    # by source only: importing a module of simclrv2.data runs simclrv2/data/__init__.py (which loads
    # them all), and a "*" rule holds in a group only for its first layer (host), before anything
    # else of ours is loaded
    data_modules = {f"simclrv2.data.{m}" for m in ("images", "base", "builtin", "folder", "datasets")}
    assert set(RULES) - grouped == {*data_modules, "simclrv2.runlock", "simclrv2.tfcheckpoint", "simclrv2.selection"}
    assert all(OURS not in RULES[layer] for layers in GROUPS.values() for layer in layers[1:])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, at load time or later (inside functions).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its
    ``__init__``). ``if TYPE_CHECKING:`` blocks are left out: they never run."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        names: list[str] = []
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names += [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
        graph[module] = set()
        for name in names:
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None (a depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()  # read once, shared by the tests below (not changed by them)
    assert "simclrv2.engine.pretrain" in graph and "simclrv2.data.index" in graph  # read the real package
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_layer_reaches_a_forbidden_module_even_late() -> None:
    graph = import_graph()
    broken = {}
    for layer, forbidden in RULES.items():
        starts = [m for m in graph if m == layer or m.startswith(layer + ".")]  # a package: every module
        if not starts:
            broken[layer] = ["no such module"]
        reached = set().union(*(_reachable(graph, s) for s in starts))
        bad = sorted(m for m in reached for f in forbidden if _forbids(f, layer, m))
        if bad:
            broken[layer] = bad
    assert broken == {}, f"layers that reach what DESIGN.md 'Layers' forbids them: {broken}"


def test_no_stage_imports_another_stage() -> None:
    graph = import_graph()
    stages = {f"simclrv2.engine.{stage}" for stage in STAGES}
    assert {s: sorted(graph[s] & stages) for s in stages if graph[s] & stages} == {}


MAX_FUNCTION_LINES = 80  # STYLE: a function a reader takes in at once


def test_no_function_is_longer_than_a_reader_takes_in_at_once() -> None:
    """Every function and method of the package, from its ``def`` line to its last line (docstring
    included), fits in MAX_FUNCTION_LINES lines."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


# Issue 33, "one of each": the name each shared piece has, and the one module that defines it
ONE_OF_EACH = {"train_classifier": "engine/classify.py", "classifier_step": "engine/classify.py",
               "load_model": "modelfile.py", "STAGES": "stages.py", "train_step": "engine/pretrain.py",
               "build_parts": "engine/pretrain.py"}


def _definitions(path: Path) -> set[str]:
    """Module-level functions and assigned names of ``path``."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    names.add(target.id)
    return names


def test_each_shared_piece_is_defined_once_and_the_timers_import_the_stage_step() -> None:
    where = {name: [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py")) if name in _definitions(p)]
             for name in ONE_OF_EACH}
    assert where == {name: [module] for name, module in ONE_OF_EACH.items()}
    # the budget and the throughput benchmark time the pretraining stage's own step, not a copy
    budget_src = (PACKAGE / "budget.py").read_text()
    bench_src = (PACKAGE.parents[1] / "benchmarks" / "throughput.py").read_text()
    assert "from .engine import pretrain" in budget_src
    assert "pretrain.build_parts(" in budget_src and "pretrain.train_step(" in budget_src
    assert "from simclrv2.engine.pretrain import build_parts, contrastive_views, train_step" in bench_src
    assert "from .engine.classify import classifier_step" in budget_src
