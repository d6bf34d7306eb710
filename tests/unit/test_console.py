"""The command layer: the shared console helpers, and the shape of the `atoll` command's modules."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from atoll.console import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, guarded, want_progress
from atoll.errors import AtollError
from tests.conftest import REPO

SRC = REPO / "src" / "atoll"


def _ns(**kwargs: object) -> argparse.Namespace:
    return argparse.Namespace(**kwargs)


def test_guard_turns_a_users_mistake_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def bad(args: argparse.Namespace, extra: list[str]) -> int:
        raise AtollError("train.steps must be positive: set --train.steps=100")

    assert guarded(bad)(_ns(), []) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "atoll: error: train.steps must be positive: set --train.steps=100\n"


def test_guard_reports_ctrl_c_with_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: argparse.Namespace, extra: list[str]) -> int:
        raise KeyboardInterrupt

    assert guarded(interrupted)(_ns(), []) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "atoll: interrupted; the last complete checkpoint is kept\n"


def test_guard_passes_exit_codes_through_and_keeps_a_bugs_traceback() -> None:
    assert guarded(lambda args, extra: EXIT_OK)(_ns(), []) == 0
    assert guarded(lambda args, extra: len(extra))(_ns(), ["--a=1", "--b=2"]) == 2

    def bug(args: argparse.Namespace, extra: list[str]) -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        guarded(bug)(_ns(), [])


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [(False, None, True), (True, None, False), (False, "1", False), (False, "0", True), (False, "", True)],
)
def test_want_progress_honours_the_flag_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, flag: bool, env: str | None, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("ATOLL_NO_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("ATOLL_NO_PROGRESS", env)
    assert want_progress(_ns(no_progress=flag)) is expected
    assert want_progress(_ns()) is (env in (None, "", "0"))  # a verb without --no-progress


def test_building_the_parser_registers_every_verb_and_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from atoll.cli import build_parser\n"
        "verbs = build_parser()._subparsers._group_actions[0].choices\n"
        "print(' '.join(verbs))\n"
        "assert 'torch' not in sys.modules, 'building the parser imported torch'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "train",
        "lighthouse",
        "site",
        "export",
        "data",
        "lab",
        "plan",
        "calibrate",
        "finetune",
        "lineage",
        "merge",
        "eval",
        "generate",
        "serve",
        "report",
    ]


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) of every import in `path`; a relative module keeps its leading dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                found.append((node.lineno, "." * node.level + (node.module or ""), alias.name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "") for alias in node.names]
    return found


def test_no_module_imports_the_cli_or_another_modules_private_names() -> None:
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(REPO)
        for line, module, name in _imports(path):
            if module == "atoll.cli" or (module == "atoll" and name == "cli"):
                offences.append(f"{where}:{line} imports atoll.cli (only entry points may)")
            if name.startswith("_") and name != "__version__" and module != "__future__":
                offences.append(f"{where}:{line} imports {module}.{name}, a private name")
    assert not offences, "\n".join(offences)


def test_a_run_failure_exits_3_and_a_mistake_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from atoll.console import guarded
    from atoll.errors import AtollError, RunFailure

    def failing(exc: Exception) -> int:
        def handler(args: argparse.Namespace, extra: list[str]) -> int:
            raise exc

        return guarded(handler)(argparse.Namespace(), [])

    assert failing(AtollError("bad key")) == 2
    assert failing(RunFailure("sites disagree")) == 3  # a launcher restarts it instead of stopping the run
    assert capsys.readouterr().err.splitlines() == ["atoll: error: bad key", "atoll: error: sites disagree"]
