"""The package's layering, read from its own import statements (every import, inside functions too).

- the metric imports nothing else of the package, and reads or writes no environment variable;
- sources never import the output, the report or the job;
- the output never imports the job or the report;
- the report never imports the job;
- the comparison of two audits never imports the job, and nothing else of the package imports it;
- no import cycle anywhere in the package;
- only the job's process set-up writes os.environ.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Set

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssim_ray"
JOB_MODULES = {"ssim_ray.run", "ssim_ray.dispatch", "ssim_ray.placement", "ssim_ray.worker", "ssim_ray.batching",
               "ssim_ray.progress", "ssim_ray.process_setup", "ssim_ray.merge_tasks"}
ENV_WRITERS = {"ssim_ray.process_setup"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _imports(name: str) -> Set[str]:
    """Package modules `name` imports: `import a.b`, `from a import b` (b a module or a name), relative too."""
    tree = ast.parse(MODULES[name].read_text())
    found: Set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # importing a.b.c runs a, a.b and a.b.c
            pieces = target.split(".")
            for i in range(1, len(pieces) + 1):
                candidate = ".".join(pieces[:i])
                # A module's own parent packages are initialised before it runs, whatever it imports: no edge.
                if candidate in MODULES and not _in(name, candidate):
                    found.add(candidate)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _violations(source_pkg: str, forbidden) -> list:
    return sorted((m, t) for m, targets in GRAPH.items() if _in(m, source_pkg) for t in targets if forbidden(t))


def test_the_package_has_the_subpackages_the_rules_talk_about():
    for package in ("ssim_ray.metric", "ssim_ray.sources", "ssim_ray.output", "ssim_ray.report"):
        assert package in MODULES, f"{package} is missing; the layering rules below would hold vacuously"
    assert any(GRAPH[m] for m in MODULES if _in(m, "ssim_ray.output")), "the import reader finds no import at all"


def test_metric_imports_nothing_else_of_the_package():
    assert _violations("ssim_ray.metric", lambda t: not _in(t, "ssim_ray.metric")) == []


def test_sources_never_import_output_report_or_job():
    bad = lambda t: _in(t, "ssim_ray.output") or _in(t, "ssim_ray.report") or t in JOB_MODULES  # noqa: E731
    assert _violations("ssim_ray.sources", bad) == []


def test_output_never_imports_the_job_or_the_report():
    assert _violations("ssim_ray.output", lambda t: _in(t, "ssim_ray.report") or t in JOB_MODULES) == []


def test_report_never_imports_the_job():
    assert _violations("ssim_ray.report", lambda t: t in JOB_MODULES) == []


def test_compare_never_imports_the_job_and_nothing_imports_compare():
    assert _violations("ssim_ray.compare", lambda t: t in JOB_MODULES) == []
    users = sorted((m, t) for m, targets in GRAPH.items() if not _in(m, "ssim_ray.compare")
                   for t in targets if _in(t, "ssim_ray.compare"))
    assert users == []


def _cycle() -> list:
    state: Dict[str, int] = {}
    stack: list = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_no_import_cycle_in_the_package():
    assert _cycle() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "ssim_ray.statuses", GRAPH["ssim_ray.statuses"] | {"ssim_ray.config"})
    monkeypatch.setitem(GRAPH, "ssim_ray.config", GRAPH["ssim_ray.config"] | {"ssim_ray.statuses"})
    assert _cycle()


def _environ_uses(name: str):
    """(line, kind) of every os.environ write (assignment, del, setdefault/update/pop/clear, putenv) and read."""
    tree = ast.parse(MODULES[name].read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ":
                    uses.append((node.lineno, "write"))
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("os.putenv", "os.unsetenv") or (
                    func.startswith("os.environ.") and func.split(".")[-1] in ("setdefault", "update", "pop", "clear",
                                                                               "popitem")):
                uses.append((node.lineno, "write"))
            elif func in ("os.getenv", "os.environ.get"):
                uses.append((node.lineno, "read"))
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and isinstance(
                node.ctx, ast.Load):
            uses.append((node.lineno, "read"))
    return uses


def test_only_the_process_set_up_writes_the_environment():
    writers = {name: [line for line, kind in _environ_uses(name) if kind == "write"] for name in MODULES}
    assert {name: lines for name, lines in writers.items() if lines and name not in ENV_WRITERS} == {}
    assert writers["ssim_ray.process_setup"], "the reader must see the process set-up's own writes"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _in(m, "ssim_ray.metric")))
def test_the_metric_reads_no_environment_variable(name):
    assert _environ_uses(name) == []


def test_compare_never_imports_the_audit_job():
    assert _violations("ssim_ray.compare", lambda t: t in JOB_MODULES) == []
