"""The layers the folders show: scripts over engine/ over models/ and datasets/ over utils/.

Each package may import only those below it (and itself); models/ and datasets/ know nothing of
each other. Read from the source, function-level imports included, so a lazy import that reaches
up is caught as well.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each package may import of the project's own packages.
ALLOWED = {
    "utils": {"utils"},
    "models": {"models", "utils"},
    "datasets": {"datasets", "utils"},
    "engine": {"engine", "models", "datasets", "utils"},
}
PROJECT_PACKAGES = set(ALLOWED) | {"benchmarks", "tests"}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project package in ``path``, by line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in PROJECT_PACKAGES]
    return sorted(found)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    reaching_up = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                   for path in sorted((ROOT / package).rglob("*.py"))
                   for line, target in project_imports(path) if target not in ALLOWED[package]]
    assert not reaching_up, reaching_up


def test_the_check_catches_an_import_that_reaches_up(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from engine.run import run_category\nimport utils.errors\n")
    assert project_imports(source) == [(2, "engine"), (3, "utils")]


@pytest.mark.parametrize("script", ["trainRM_ST.py", "trainRM_RD.py", "predict.py", "export.py"])
def test_help_answers_without_loading_torch(script):
    probe = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
             f"try:\n    runpy.run_path({script!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("args, message", [
    (["train.epochs=-1"], "train.epochs"), (["no.such=1"], "unknown config key"), (["missing.yaml"], "does not exist"),
])
def test_config_errors_answer_without_loading_torch(args, message):
    probe = ("import sys\nfrom engine.cli import main\n"
             f"code = main('st', {args!r})\n"
             "assert code == 2, code\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
