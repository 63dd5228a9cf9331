"""Which parts of emomae may import which, and that no two of its files import each other.

Layer rules: each module is imported in a fresh process and the modules it pulled in are checked
against the rules (docs/architecture.md, "Import rules"). One interpreter imports torch, numpy, timm
and einops (third-party code no rule forbids) once, then forks a child per module, so each child
starts from the same clean state as a fresh interpreter without paying for torch again.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("emomae", "pretrain", "finetune", "data_pipelines")


def project_modules(root: Path, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root` (subpackages too)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


LIGHTNING = ("pytorch_lightning", "lightning_fabric", "lightning")
TRAINING = (
    "pretrain.module",
    "pretrain.train",
    "pretrain.callbacks",
    "pretrain.inject",
    "pretrain.deepspeed",
    "pretrain.optim",
)
# fine-tuning's Lightning side: the LightningModule, its training streams and the `emomae finetune` driver
FINETUNE_WITH_LIGHTNING = ("finetune.module", "finetune.streams", "finetune.train")
# the pieces of fine-tuning that work on tensors alone: no data code either
FINETUNE_MODEL_SIDE = (
    "finetune.heads",
    "finetune.mixup",
    "finetune.modality",
    "finetune.losses",
    "finetune.optim",
    "finetune.full_model",
    "finetune.metrics",
    "finetune.selection",
    "finetune.distributed",
)

RULES = {
    # the exported model: torch, timm, einops only; no Lightning, no data code, no training code
    "pretrain.encoders": (*LIGHTNING, "deepspeed", "data_pipelines", "finetune", "emomae", *TRAINING),
    # the optimizer pieces both stages share: torch and timm only
    "emomae.optim": (*LIGHTNING, "data_pipelines", "pretrain", "finetune"),
    # stage 2's config schema and caption loss: plain dataclasses and torch, no Lightning or data code
    "pretrain.inject_config": (*LIGHTNING, "data_pipelines", "finetune", *TRAINING),
    "pretrain.caption_loss": (*LIGHTNING, "data_pipelines", "finetune", *TRAINING),
    # the data side stands alone: it never imports the model or the tasks
    "data_pipelines.shards": ("pretrain", "finetune", *LIGHTNING),
    "data_pipelines.stream": ("pretrain", "finetune", *LIGHTNING),
    "data_pipelines.datamodule": ("pretrain", "finetune"),
    "data_pipelines.caption_mix": ("pretrain", "finetune"),
    "data_pipelines.synthetic": ("pretrain", "finetune", *LIGHTNING),
    # load_encoder, embed, zero-shot, the probes and every other part of fine-tuning outside its
    # Lightning side run without Lightning and only use the model side of pretrain
    **{
        module: (*LIGHTNING, *TRAINING)
        for module in project_modules(REPO, ("finetune",))
        if module not in FINETUNE_WITH_LIGHTNING
    },
    **{module: (*LIGHTNING, *TRAINING, "data_pipelines") for module in FINETUNE_MODEL_SIDE},
    # fine-tuning uses Lightning, but not pretraining's training code
    **{module: TRAINING for module in FINETUNE_WITH_LIGHTNING},
}
# imported once, before the forks: third-party modules that no rule forbids
PRELOAD = ("torch", "numpy", "timm", "einops")
# run by one fresh interpreter: preload, then per module a forked child imports it and reports
# sys.modules through a pipe (or the error that stopped the import)
FORK_PER_MODULE = """
import importlib, json, os, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
found = {"preloaded": sorted(sys.modules)}
for module in sys.argv[2].split(","):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            report = sorted(sys.modules)
        except BaseException as err:
            report = f"{type(err).__name__}: {err}"
        with os.fdopen(write, "w") as out:
            json.dump(report, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as inp:
        found[module] = json.load(inp)
    os.waitpid(pid, 0)
print(json.dumps(found))
"""


def imported_by_each(modules: Iterable[str]) -> dict[str, set[str] | str]:
    """module -> every module loaded once it is imported (from a clean start), or the import's error;
    "preloaded" -> what each child started with."""
    argv = [sys.executable, "-c", FORK_PER_MODULE, ",".join(PRELOAD), ",".join(modules)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=True).stdout
    found = json.loads(out.splitlines()[-1])
    return {k: v if isinstance(v, str) else set(v) for k, v in found.items()}


def forbidden_in(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for f in forbidden if m == f or m.startswith(f + "."))


@pytest.fixture(scope="module")
def imports() -> dict[str, set[str] | str]:
    return imported_by_each([*sorted(RULES), "pretrain.module", "pretrain.train"])


@pytest.mark.parametrize("module", sorted(RULES))
def test_each_module_imports_only_what_its_layer_may(module, imports):
    loaded = imports[module]
    assert not isinstance(loaded, str), f"importing {module} failed: {loaded}"
    bad = forbidden_in(loaded, RULES[module])
    assert not bad, f"{module} imports {bad[:5]}"


def test_the_check_sees_a_forbidden_import(imports):
    # the training module does import Lightning and the data side: the same check must name them
    assert forbidden_in(imports["pretrain.module"], LIGHTNING)
    assert forbidden_in(imports["pretrain.train"], ("data_pipelines",))
    # and the preload hides nothing: no forbidden module is loaded before a child imports its own
    assert not forbidden_in(imports["preloaded"], tuple({f for rule in RULES.values() for f in rule}))
    assert not forbidden_in(imports["preloaded"], CODE_PACKAGES)


def test_every_finetune_module_has_a_rule():
    assert set(project_modules(REPO, ("finetune",))) <= set(RULES)
    assert set(FINETUNE_MODEL_SIDE) <= set(project_modules(REPO, ("finetune",)))


# ---------------------------------------------------------------- import cycles between files
#
# The graph is static (ast), so it sees imports inside functions too, which a fresh interpreter only
# meets when they run. Counted: every `import x.y` / `from x import y` of a project module, at any
# depth, relative imports resolved; not counted: imports under `if TYPE_CHECKING:` (never executed).
# `from pkg import name` is an edge to pkg/name.py when that is a module, else to pkg/__init__.py.
# A package __init__ is a file like any other: its re-exports are its edges to the submodules they
# come from, and importing a name it re-exports is an edge to it. The parents Python runs before a
# submodule (`import a.b.c` runs a/__init__.py and a/b/__init__.py first) are not edges: every
# submodule would then depend on its package's __init__, and any __init__ that re-exports would close
# a cycle that cannot fail at import time (the parent is always initialised first).


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a parsed file, at any depth, except in `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, modules: Container[str]) -> set[str]:
    """The project modules the file `path` (module `name`) imports, by the rules above."""
    targets = set()
    for node in import_statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the file's package, one level up per extra dot
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph(root: Path, packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest path start -> ... -> start (breadth first), without the repeated start."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest import cycle through each module that is on one, each cycle listed once (starting
    at its smallest name). Every module of a cycle shows up in at least one of them."""
    cycles = set()
    for module in sorted(graph):
        cycle = _shortest_cycle(graph, module)
        if cycle:
            first = cycle.index(min(cycle))
            cycles.add(tuple(cycle[first:] + cycle[:first]))
    return [list(c) for c in sorted(cycles)]


def describe_cycle(cycle: list[str], modules: dict[str, Path], root: Path) -> str:
    files = [modules[m].relative_to(root).as_posix() for m in (*cycle, cycle[0])]
    return " -> ".join(files)


def test_no_import_cycles_between_files():
    modules = project_modules(REPO)
    cycles = [describe_cycle(c, modules, REPO) for c in import_cycles(import_graph(REPO))]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_the_cycle_finder_sees_a_cycle(tmp_path):
    # a package whose cycle runs through a function-level import, a relative import and an __init__
    # re-export, next to a TYPE_CHECKING-only back edge that must not count
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "A = 1\ndef f():\n    from . import b\n",
        "pkg/b.py": "import pkg.c\n",
        "pkg/c.py": "from pkg import A\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\n",
        "pkg/e.py": "from pkg import d\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert import_cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg.c"]]
    modules = project_modules(tmp_path, ("pkg",))
    assert describe_cycle(["pkg.a", "pkg.b"], modules, tmp_path) == "pkg/a.py -> pkg/b.py -> pkg/a.py"
