"""The house rules of the package: stages import only stages before them, modules below every stage (tokenizer,
atomic) import no stage, no module imports itself back through a chain of imports (a cycle, within a stage or
across), and no source file grows past ~500 lines.

Imports are read with `ast`, every form resolved to the module it loads: `from ..run.io import x`,
`from ..run import io`, `from .. import run`, `from jalias import run`, `from jalias import demo` (a lazy name of
`jalias/__init__.py`, resolved through its `_LAZY` table), `import jalias.run.io [as m]`, parenthesised and
function-level (lazy) imports included. Imports under `if TYPE_CHECKING:` count for the layering, not for cycles
(they never run).
"""

import ast
from pathlib import Path

import jalias

PKG = Path(__file__).resolve().parents[1] / "jalias"
ORDER = ["model", "weights", "engine", "search", "data", "train", "adapt", "run", "cli"]  # the README's data-flow order
RANK = {k: i for i, k in enumerate(ORDER)}


def _module(path: Path) -> str:
    """Dotted module name of a file under PKG (a package's __init__.py is the package)."""
    parts = ("jalias",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module(f): f for f in sorted(PKG.rglob("*.py"))}
PACKAGES = {_module(f) for f in SOURCES.values() if f.name == "__init__.py"}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def _known(name: str, modules) -> str:
    """The longest prefix of dotted `name` that is a module of the package (importing it loads that file)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, is_package: bool = False, modules=None) -> list[tuple[str, int, bool]]:
    """(imported jalias module, line, under TYPE_CHECKING) for every import in `source`, the code of `module`."""
    modules = set(SOURCES) if modules is None else set(modules)
    here = module if is_package else module.rsplit(".", 1)[0]
    out = []

    def visit(node, typing_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                for sub in child.body:
                    visit_one(sub, True)
                for sub in child.orelse:
                    visit_one(sub, typing_only)
            else:
                visit_one(child, typing_only)

    def visit_one(node, typing_only):
        if isinstance(node, ast.Import):
            out.extend((_known(a.name, modules), node.lineno, typing_only) for a in node.names
                       if a.name == "jalias" or a.name.startswith("jalias."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base != "jalias" and not base.startswith("jalias."):
                return
            for a in node.names:
                name = f"{base}.{a.name}"
                if name in modules:
                    out.append((name, node.lineno, typing_only))
                elif base == "jalias" and a.name in jalias._LAZY:
                    out.append((_known(jalias._LAZY[a.name], modules), node.lineno, typing_only))
                else:
                    out.append((_known(base, modules), node.lineno, typing_only))
        visit(node, typing_only)

    visit(ast.parse(source), False)
    return out


def upward_imports(module: str, deps) -> list[str]:
    """What in deps (imported module names) breaks the layering for `module`."""
    own = _stage(module)
    bad = []
    for dep, line, _ in deps:
        stage = _stage(dep)
        if stage is None:
            continue
        if own is None and module != "jalias":  # tokenizer, atomic: below every stage
            bad.append(f"{module}:{line} imports {dep} (modules below the stages import none)")
        elif own is not None and RANK[stage] > RANK[own]:
            bad.append(f"{module}:{line} imports {dep} (stage {stage} comes after {own})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def _graph(sources: dict[str, str], packages=()) -> dict[str, set[str]]:
    return {m: {d for d, _, typing_only in imports_of(src, m, m in packages, sources) if not typing_only}
            for m, src in sources.items()}


def test_no_upward_imports():
    bad = []
    for module, f in SOURCES.items():
        bad += upward_imports(module, imports_of(f.read_text(), module, module in PACKAGES))
    assert not bad, bad


def test_no_import_cycles():
    found = cycles(_graph({m: f.read_text() for m, f in SOURCES.items()}, PACKAGES))
    assert not found, found


PLANTED_UPWARD = {  # an engine-stage file importing the run stage, in every form
    "from ..run.io import x": "jalias.run.io",
    "from ..run import io": "jalias.run.io",
    "from .. import run": "jalias.run",
    "from .. import (\n    atomic,\n    run,\n)": "jalias.run",
    "from jalias import run": "jalias.run",
    "from jalias import demo": "jalias.run.api",
    "from jalias.run import io": "jalias.run.io",
    "from jalias.run.io import x": "jalias.run.io",
    "import jalias.run.io": "jalias.run.io",
    "import jalias.run.io as rio": "jalias.run.io",
    "def f():\n    from jalias import run\n    return run": "jalias.run",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..run import io": "jalias.run.io",
}


def test_the_check_sees_an_upward_import_in_every_form():
    for source, target in PLANTED_UPWARD.items():
        deps = imports_of(source, "jalias.engine.planted")
        assert target in [d for d, _, _ in deps], (source, deps)
        assert upward_imports("jalias.engine.planted", deps), source
    # the same forms one level deeper, and from a package's __init__ (relative imports resolve from the package)
    assert upward_imports("jalias.engine.sub.x", imports_of("from ...run import io", "jalias.engine.sub.x"))
    assert upward_imports("jalias.engine", imports_of("from .. import run", "jalias.engine", is_package=True))
    assert upward_imports("jalias.tokenizer", imports_of("from . import engine", "jalias.tokenizer"))
    # downward and same-stage imports are fine
    for source in ("from ..model import sam3", "from . import scoring", "from jalias import atomic, tokenizer",
                   "from jalias.model.sam3 import Sam3", "import numpy as np"):
        assert not upward_imports("jalias.engine.planted", imports_of(source, "jalias.engine.planted")), source


def test_the_check_sees_a_cycle_within_a_stage():
    sources = {"jalias.run": "from .a import f", "jalias.run.a": "def f():\n    from .b import g",
               "jalias.run.b": "from jalias.run import a", "jalias.run.c": "from . import a"}
    assert cycles(_graph(sources, {"jalias.run"})) == [["jalias.run.a", "jalias.run.b"]]
    sources["jalias.run.b"] = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a"
    assert cycles(_graph(sources, {"jalias.run"})) == []  # typing-only imports never run
    assert cycles({"jalias.x": {"jalias.x"}}) == [["jalias.x"]]


def test_no_file_over_500_lines():
    long = {str(f.relative_to(PKG)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long
