"""The house rules of the package: stages import only stages before them, and no source file grows past ~500 lines."""

import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jalias"
ORDER = ["model", "weights", "engine", "search", "data", "train", "adapt", "run", "cli"]  # the README's data-flow order
IMPORT = re.compile(r"^\s*(?:from\s+(?:\.\.|jalias\.)(\w+)|import\s+jalias\.(\w+))", re.M)


def _stage(path: Path) -> str | None:
    top = path.relative_to(PKG).parts[0]
    name = top.removesuffix(".py")
    return name if name in ORDER else None


def test_no_upward_imports():
    rank = {k: i for i, k in enumerate(ORDER)}
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        own = _stage(f)
        if own is None:
            continue
        for m in IMPORT.finditer(f.read_text()):
            dep = m.group(1) or m.group(2)
            if dep in rank and rank[dep] > rank[own]:
                bad.append(f"{f.relative_to(PKG)} imports {dep}")
    assert not bad, bad


def test_the_check_sees_an_upward_import():
    assert IMPORT.search("    from ..run.io import x").group(1) == "run"
    assert IMPORT.search("import jalias.search.gcg").group(2) == "search"


def test_no_file_over_500_lines():
    long = {str(f.relative_to(PKG)): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long
