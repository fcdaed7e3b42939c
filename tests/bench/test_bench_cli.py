"""Every benchmark imports and parses its command line: an ImportError in bench/ (a renamed or private
name) fails here, not when someone next runs the benchmark."""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports_and_parses_help(name, monkeypatch, capsys):
    mod = importlib.import_module(f"bench.{name}")
    main = getattr(mod, "main", None)
    if main is None:  # a helper module (bench/common.py, bench/_stages_common.py)
        assert not name.startswith("test"), name
        return
    monkeypatch.setattr(sys, "argv", [f"bench/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"]) if inspect.signature(main).parameters else main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
