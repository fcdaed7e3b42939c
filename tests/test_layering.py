"""The import rules of ../shared/ARCHITECTURE.md, enforced by reading every source file's imports (AST,
function-level imports included): allmrec/ is plain PyTorch (no ray, deepspeed, fastapi); pipelines/ and
serve/ never import each other; a job module never imports another job (jobs share the library and the
named shared modules of pipelines/); nothing imports another module's private (_underscore) names;
bench/ and scripts/ never import tests/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the jobs of pipelines/ (one command each); run.py and cli.py orchestrate them and may import them
JOBS = {"prepare", "encode", "train_cf", "stage1", "stage2", "tallrec", "evaluate", "genres", "score", "export"}
ORCHESTRATORS = {"run", "cli"}


def _files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            names = [a.name for a in node.names]
            out.append((mod, names, node.lineno))
            # `from pipelines import stage1` imports the module pipelines.stage1
            out += [(f"{mod}.{n}", [], node.lineno) for n in names if f"{mod}.{n}".startswith("pipelines.")]
    return out


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_the_rules_see_imports_inside_functions_and_relative_ones(tmp_path):
    src = REPO / "pipelines" / "_layering_probe.py"
    try:
        src.write_text("def f():\n    import ray.train\n    from .stage1 import _x\n    from pipelines import score\n")
        got = imports(src)
    finally:
        src.unlink()
    assert ("ray.train", [], 2) in got and ("pipelines.stage1", ["_x"], 3) in got and ("pipelines.score", [], 4) in got


@pytest.mark.parametrize("path", _files("allmrec"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_ray_deepspeed_or_fastapi(path):
    bad = [(m, line) for m, _, line in imports(path) if _top(m) in {"ray", "deepspeed", "fastapi"}]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: allmrec/ is plain PyTorch"


@pytest.mark.parametrize("folder,other", [("pipelines", "serve"), ("serve", "pipelines")])
def test_pipelines_and_serve_never_import_each_other(folder, other):
    bad = [(str(p.relative_to(REPO)), m, line) for p in _files(folder) for m, _, line in imports(p) if _top(m) == other]
    assert not bad, f"{folder}/ imports {other}/: {bad}"


def test_no_job_imports_another_job():
    bad = []
    for p in _files("pipelines"):
        if p.stem in ORCHESTRATORS:
            continue
        for m, _, line in imports(p):
            parts = m.split(".")
            if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in JOBS and parts[1] != p.stem:
                bad.append((str(p.relative_to(REPO)), m, line))
    assert not bad, f"jobs import other jobs (move what they share into a shared module): {bad}"


@pytest.mark.parametrize("folder", ["pipelines", "serve", "bench", "scripts"])
def test_no_private_names_cross_modules(folder):
    """Jobs, the service, benchmarks and scripts use the library's and each other's public API only."""
    bad = []
    for p in _files(folder):
        for m, names, line in imports(p):
            if _top(m) in {"allmrec", "pipelines", "serve", "bench", "scripts"}:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private:
                    bad.append((str(p.relative_to(REPO)), m, private, line))
    assert not bad, f"private names imported from other modules: {bad}"


# none left: the synthetic inputs that benchmarks and tests share live in bench/fixtures.py. Anything listed
# here must be a real import (checked), so that a known exception goes when the import does.
KNOWN_TEST_IMPORTS: set[tuple[str, str]] = set()


@pytest.mark.parametrize("folder", ["bench", "scripts", "allmrec", "pipelines", "serve"])
def test_nothing_outside_tests_imports_tests(folder):
    found = {(str(p.relative_to(REPO)), m) for p in _files(folder) for m, _, _ in imports(p) if _top(m) == "tests"}
    known = {k for k in KNOWN_TEST_IMPORTS if k[0].startswith(folder + "/")}
    assert found - known == set(), f"{folder}/ imports tests/: {sorted(found - known)}"
    assert known <= found, f"fixed, remove from KNOWN_TEST_IMPORTS: {sorted(known - found)}"
