"""Fixtures for the CLI tests: the tiny model of ``tiny_model.py`` installed in-process or in a subprocess."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_CLI_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_CLI_DIR.parent.parent


def load_tiny_model_module():
    """``tests/cli/tiny_model.py`` by path (independent of pytest's import mode)."""
    spec = importlib.util.spec_from_file_location("arq_cli_tests_tiny_model", TESTS_CLI_DIR / "tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny(monkeypatch):
    """The tiny model module, with its model and data set installed as the CLI's loaders."""
    from arq.cli import common

    module = load_tiny_model_module()
    monkeypatch.setattr(common, "load_model", lambda spec: module.NearestCentreClassifier())
    monkeypatch.setattr(common, "load_dataset", lambda name, split, root: module.tiny_dataset())
    return module


SUBPROCESS_SCRIPT = """
import importlib.util, sys
sys.path.insert(0, {repo!r})
spec = importlib.util.spec_from_file_location("tiny_model", {tiny!r})
tiny_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny_model)
kill = {kill!r}
tiny_model.install(tuple(kill) if kill else None)
from arq.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def run_arq_subprocess(tmp_path):
    """Run ``arq ARGS`` with the tiny model in a fresh Python; ``kill_when_file_has_rows=(path, k)``
    makes the process SIGKILL itself once ``path`` holds k rows."""

    def run(args, kill_when_file_has_rows=None):
        script = tmp_path / "run_arq_with_tiny_model.py"
        script.write_text(SUBPROCESS_SCRIPT.format(
            repo=str(REPO_ROOT), tiny=str(TESTS_CLI_DIR / "tiny_model.py"),
            kill=list(kill_when_file_has_rows) if kill_when_file_has_rows else None,
        ))
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              cwd=tmp_path, env=environment, timeout=300)

    return run
