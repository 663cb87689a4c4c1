"""The package's import layering and module sizes, read from the source (nothing imported).

Layers, bottom up: neutral helpers (tensors, sharding, the extension loader); the kernels
and their drivers (fastlars/ops, which read the step's plan and never the optimizer); the
backend registry; the user-facing modules (fastlars/optim, fastlars/nn); the rest (the
package root, info, recipes, benchmarks, the study). A module imports its own layer or
lower ones, function-level imports included, and the graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastlars"
MAX_LINES = 500

LAYERS = [
    ("neutral", ("fastlars._extension", "fastlars._cuda_toolkit", "fastlars._tensors", "fastlars._sharded")),
    ("kernels", ("fastlars.ops",)),
    ("registry", ("fastlars.backends",)),
    ("modules", ("fastlars.optim", "fastlars.nn")),
]


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return len(LAYERS)  # the package root, info, recipes, benchmarks, the study


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fastlars modules ``name`` imports, anywhere in its source. ``from pkg import x``
    counts as an import of ``pkg.x`` when that is a module, else of ``pkg``. The version
    constant (``from . import __version__``) is left out: setuptools reads it from the
    package root's source as the one version, and it is not code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fastlars"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "fastlars":
                continue
            for alias in node.names:
                if alias.name == "__version__":
                    continue
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_imports_go_down_the_layers():
    upward = [f"{a} ({LAYERS[layer_of(a)][0] if layer_of(a) < len(LAYERS) else 'top'}) imports {b}"
              for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(sorted(upward))


def test_ops_never_import_the_optimizers():
    assert not [(a, b) for a, targets in graph().items() if a.startswith("fastlars.ops")
                for b in targets if b.startswith("fastlars.optim")]


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    too_long = {n: s for n, s in sizes.items() if s > MAX_LINES}
    assert not too_long, too_long


def test_no_importlib_on_our_own_modules():
    """Our modules are imported by name (a search for a function finds its callers)."""
    offenders = [name for name, path in modules().items() if "import_module(f" in path.read_text()]
    assert not offenders, offenders


def test_ops_read_no_param_group():
    """The kernels' drivers get each group as its record's row (fastlars/optim/_hyper.py): an
    option's meaning is decoded once, in the optimizers, never again from the group dict."""
    import re

    reads = re.compile(r"\bgroup\[|\bgroup\.get\(|\.group\b|\.param_groups\b")
    offenders = [f"{name}:{number}: {line.strip()}" for name, path in modules().items() if name.startswith("fastlars.ops")
                 for number, line in enumerate(path.read_text().splitlines(), 1) if reads.search(line)]
    assert not offenders, "\n".join(offenders)
