"""The package's layers, read from the source: asgd/ is the library every process imports and
names no side (server/, worker/); the sides import neither the launcher (asgd/launch/) nor the
research tooling (asgd/experiments/); the ``asgd`` command loads no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement in a file, at any depth (lazy ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imports(path):
            if module.split(".")[0] in banned or module.startswith(banned):
                found.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    return found


def test_the_library_names_no_side():
    assert offenders("asgd", ("server", "worker")) == []


def test_the_sides_import_neither_the_launcher_nor_the_experiments():
    banned = ("asgd.launch", "asgd.experiments")
    assert offenders("server", banned) == [] and offenders("worker", banned) == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.main import run_server\n    import worker.train\n")
    assert imports(f) == [(2, "server.main"), (3, "worker.train")]


def test_the_command_line_loads_no_torch_and_finds_both_sides():
    code = ("import sys, click, asgd.cli as c; ctx = click.Context(c.cli); "
            "assert {'server', 'worker'} <= set(c.cli.list_commands(ctx)); "
            "assert 'torch' not in sys.modules, 'asgd.cli loaded torch'; "
            "c.cli.get_command(ctx, 'server'); c.cli.get_command(ctx, 'worker'); "
            "assert 'torch' not in sys.modules, 'a side command loaded torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
