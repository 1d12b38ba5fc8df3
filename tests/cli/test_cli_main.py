"""The ``arq`` dispatcher."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arq.cli import main as cli_main
from arq.cli.main import SUBCOMMANDS, main


def test_help_lists_the_available_subcommands(capsys):
    assert main(["--help"]) == 0
    output = capsys.readouterr().out
    for name in ("certify", "predict", "analyze"):
        assert name in output
    assert {"certify", "predict", "analyze"} <= set(SUBCOMMANDS)


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: arq" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_a_missing_subcommand_module_is_just_absent(monkeypatch, capsys):
    real_import = cli_main.importlib.import_module

    def import_without_predict(name):
        if name == "arq.cli.predict":
            error = ModuleNotFoundError(f"No module named {name!r}")
            error.name = name
            raise error
        return real_import(name)

    monkeypatch.setattr(cli_main.importlib, "import_module", import_without_predict)
    assert cli_main.load_subcommand("predict") is None
    assert main(["predict", "mnist", "m", "out.tsv"]) == 2
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_one_subcommand_imports_only_its_module():
    code = (
        "import sys; from arq.cli.main import main; main(['analyze', '--help']); "
        "print(sorted(m for m in sys.modules if m.startswith('arq.cli.')))"
    )
    repo_root = Path(__file__).resolve().parents[2]
    environment = dict(os.environ, PYTHONPATH=str(repo_root))
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env=environment).stdout
    assert output.splitlines()[-1] == "['arq.cli.analyze', 'arq.cli.common', 'arq.cli.main']"


@pytest.mark.parametrize("command, arguments, hint", [
    ("train", ["--dataset", "mnist", "--arch", "lenet", "--sigma", "0.25", "--out", "unused"],
     "arq train: interrupted; its last checkpoint is complete (continue with --resume)"),
    ("zoo", [], "arq zoo: interrupted\n"),
])
def test_an_interrupted_command_says_what_it_kept(monkeypatch, capsys, command, arguments, hint):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"arq.cli.{command}"), "run", interrupted)
    assert main([command, *arguments]) == cli_main.EXIT_INTERRUPTED
    assert capsys.readouterr().err.endswith(hint if hint.endswith("\n") else hint + "\n")
