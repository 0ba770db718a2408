"""The floor plan holds: imports run one way (odedit <- pipeline <- jobs, bench), no module circles, every
module imports on its own, and every function-local project import says why it is deferred (docs/architecture.md).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"odedit": 0, "pipeline": 1, "jobs": 2, "bench": 2}
DEFERRED = "deferred"  # the word a function-local project import's comment carries


def modules() -> dict[str, Path]:
    found = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, function-local) for every import statement of a project module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local = {
        id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, node.lineno, id(node) in local))
    return out


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_import_runs_upward():
    known = modules()
    upward = [
        f"{name}:{line} imports {target}"
        for name, path in known.items()
        for target, line, _ in imports_of(name, path, known)
        if layer(target) > layer(name)
    ]
    assert upward == [], "lower layers must not import higher ones (odedit <- pipeline <- jobs, bench):\n" + "\n".join(
        upward
    )


def test_no_import_circles():
    known = modules()
    graph = {name: {t for t, _, _ in imports_of(name, path, known)} for name, path in known.items()}
    circles = strongly_connected(graph)
    assert circles == [], f"modules that import each other (function-local imports count): {circles}"


def test_function_local_project_imports_say_why_they_are_deferred():
    known = modules()
    silent = []
    for name, path in known.items():
        lines = path.read_text().splitlines()
        for target, line, local in imports_of(name, path, known):
            if not local:
                continue
            here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
            block = _import_block_comment(lines, line)
            if DEFERRED not in here and DEFERRED not in above and DEFERRED not in block:
                silent.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert silent == [], (
        "a function-local import of project code is a deliberate deferral of a heavy "
        f"dependency and says so with a '# {DEFERRED}: <why>' comment:\n" + "\n".join(sorted(set(silent)))
    )


def _import_block_comment(lines: list[str], line: int) -> str:
    """The comment heading the run of import lines that `line` belongs to (a deferred block shares one)."""
    i = line - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
        i -= 1
    return lines[i] if i >= 0 else ""


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the sets of more than one module that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_test_files_have_unique_basenames():
    """pytest imports test modules by basename (rootdir-relative, no __init__.py): two alike names collide."""
    seen: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


# A parent interpreter loads the third-party libraries once (no project module), then forks one child per
# project module; each child imports that module alone, so a module that only imports after some other project
# module was imported first (an order-dependent circle) fails here. Forking keeps the test to seconds.
_FORK_IMPORTER = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    for lib in ("numpy", "torch", "pyarrow", "pyarrow.parquet", "yaml", "PIL.Image", "safetensors.torch",
                "transformers", "peft", "ray", "ray.data", "ray.train", "ray.tune", "mlflow", "matplotlib"):
        try:
            importlib.import_module(lib)
        except Exception:
            pass
    assert not [m for m in sys.modules if m.split(".")[0] in ("odedit", "pipeline", "jobs", "bench")]
    failures = {}
    for name in json.loads(sys.argv[1]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                msg = b""
            except BaseException:
                msg = traceback.format_exc().encode()
            os.write(write, msg[-4000:])
            os._exit(0)
        os.close(write)
        chunks = []
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        text = b"".join(chunks).decode(errors="replace")
        if text or status != 0:
            failures[name] = text or f"exit status {status}"
    print(json.dumps(failures))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone():
    names = sorted(modules())
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_IMPORTER, json.dumps(names)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n\n".join(f"{name}:\n{err}" for name, err in failures.items())


def test_a_broken_import_is_reported_by_the_importer(tmp_path):
    """The forking importer itself: a module that cannot import is named with its error."""
    pkg = tmp_path / "odedit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "broken.py").write_text("import not_a_module_anywhere\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _FORK_IMPORTER.replace(
                'assert not [m for m in sys.modules if m.split(".")[0] in ("odedit", "pipeline", "jobs", "bench")]', ""
            ),
            json.dumps(["odedit", "odedit.broken"]),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(failures) == ["odedit.broken"] and "not_a_module_anywhere" in failures["odedit.broken"]
