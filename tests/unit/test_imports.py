"""Guard: the layers of docs/ARCHITECTURE.md, read from the source's import statements.

Nothing is imported to check the rules (``ast`` only), except the last test, which runs the
planning commands the way a user does and looks at what Python loaded. The rules:

* ``paratrain/core/**`` -- the torch-free package under both the runtime and the planner --
  imports the standard library, other core modules, ``paratrain.errors`` (its errors are user
  errors) and ``paratrain.models.configs`` (the model shapes it counts over). Nothing else.
* ``paratrain/plan/**`` imports the standard library and only core, config (the Layout, the
  vocabulary shared with the runtime), errors, models.configs, mesh (pure rank arithmetic) and
  text: never torch, the strategies (``parallel``), ``train``, ``launch``, ``metrics``, ``comm``
  or ``calibrate`` (the runtime side, which measures this machine for the planner).
* ``paratrain/models/**`` (the reference models, the test oracle) imports no parallel code:
  ``parallel``, ``comm``, ``mesh``, ``launch``, ``train``, ``torch.distributed``.
* What core and plan import when they load (module-level imports, followed through every
  paratrain module they reach, package ``__init__`` files included) never reaches torch.
* ``paratrain estimate | plan | simulate | schedule | explain`` never import torch (nor numpy).

Imports inside functions count for the first three rules (they run when the function does);
``if TYPE_CHECKING:`` imports count too (a type from a layer above is still a dependency).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "paratrain"
STDLIB = sys.stdlib_module_names

CORE_MAY_IMPORT = ("paratrain.core", "paratrain.errors", "paratrain.models.configs")
PLAN_MAY_IMPORT = ("paratrain.plan", "paratrain.core", "paratrain.config", "paratrain.errors",
                   "paratrain.models.configs", "paratrain.mesh", "paratrain.text")
MODELS_MAY_NOT_IMPORT = ("paratrain.parallel", "paratrain.comm", "paratrain.mesh", "paratrain.launch",
                         "paratrain.train", "torch.distributed")


@dataclass(frozen=True)
class Import:
    name: str  # the module imported, absolute (``from paratrain import comm`` -> paratrain.comm)
    line: int
    at_load: bool  # runs when the module is imported (not inside a function, not TYPE_CHECKING)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@cache
def imports_of(path: Path) -> tuple[Import, ...]:
    """Every import statement of ``path``, resolved to absolute module names."""
    found: list[Import] = []

    def visit(node: ast.AST, at_load: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, at_load) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, path)
            for a in node.names:  # ``from pkg import sub`` imports the submodule when there is one
                sub = f"{base}.{a.name}"
                found.append(Import(sub if _is_module(sub) else base, node.lineno, at_load))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_load)
            return
        inner = at_load and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return tuple(found)


def sources(subpackage: str) -> list[Path]:
    files = sorted((PACKAGE / subpackage).rglob("*.py"))
    assert files, f"no source files under paratrain/{subpackage}"
    return files


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _where(path: Path, imp: Import) -> str:
    return f"{path.relative_to(ROOT)}:{imp.line} imports {imp.name}"


def violations(subpackage: str, allowed: tuple[str, ...] | None = None,
               forbidden: tuple[str, ...] = ()) -> list[str]:
    """Imports under ``paratrain/<subpackage>`` of a paratrain module outside ``allowed`` (if
    given), of a third-party package (if ``allowed`` is given: standard library only), or of
    anything in ``forbidden``."""
    bad = []
    for path in sources(subpackage):
        for imp in imports_of(path):
            top = imp.name.split(".")[0]
            if _within(imp.name, forbidden):
                bad.append(_where(path, imp))
            elif allowed is not None and top == "paratrain" and not _within(imp.name, allowed):
                bad.append(_where(path, imp))
            elif allowed is not None and top not in STDLIB and top != "paratrain":
                bad.append(_where(path, imp))
    return bad


def test_core_imports_only_core_errors_and_model_configs() -> None:
    bad = violations("core", allowed=CORE_MAY_IMPORT, forbidden=("torch",))
    assert not bad, f"paratrain.core may import only the standard library and {CORE_MAY_IMPORT}: {bad}"


def test_planner_imports_no_torch_and_no_runtime() -> None:
    bad = violations("plan", allowed=PLAN_MAY_IMPORT, forbidden=("torch",))
    assert not bad, f"paratrain.plan may import only the standard library and {PLAN_MAY_IMPORT}: {bad}"


def test_reference_models_import_no_parallel_code() -> None:
    bad = violations("models", forbidden=MODELS_MAY_NOT_IMPORT)
    assert not bad, f"paratrain.models may not import {MODELS_MAY_NOT_IMPORT}: {bad}"


def _file_of(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for path in ((ROOT / rel).with_suffix(".py"), ROOT / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def loaded_with(start: list[str]) -> dict[str, str | None]:
    """Every module that importing ``start`` loads, as ``{module: the module whose import
    statement loads it}`` (None for ``start``): module-level imports followed through
    paratrain's own modules, each one's parent packages (their ``__init__`` runs first) included."""
    seen: dict[str, str | None] = {}
    todo: list[tuple[str, str | None]] = [(name, None) for name in start]
    while todo:
        name, by = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in seen:
                continue
            seen[mod] = by
            path = _file_of(mod) if parts[0] == "paratrain" else None
            if path is not None:
                todo += [(imp.name, mod) for imp in imports_of(path) if imp.at_load]
    return seen


def _chain(loaded: dict[str, str | None], mod: str) -> str:
    links = [mod]
    while (by := loaded[links[-1]]) is not None:
        links.append(by)
    return " <- ".join(links)


def test_core_and_planner_load_without_torch() -> None:
    start = [module_name(p) for sub in ("core", "plan") for p in sources(sub)]
    loaded = loaded_with(start)
    assert "paratrain.plan.cost" in loaded and "paratrain.core.traffic" in loaded  # the walk walked
    torch = [_chain(loaded, m) for m in loaded if m == "torch"]
    assert not torch, f"importing core or plan loads torch: {torch}"


def test_planning_commands_never_import_torch() -> None:
    """The five planning commands (explain also with a Hugging Face config), one after the other
    in a fresh interpreter, as a user runs them; then no torch (nor numpy) in ``sys.modules``.
    ``schedule`` without ``--out``: drawing the PNG loads matplotlib, and with it numpy."""
    commands = [
        ["estimate", "--model", "gpt2-350m", "--dp", "2", "--pp", "2", "--tp", "2", "--microbatches", "4",
         "--global-batch", "16"],
        ["plan", "--model", "gpt2-1.3b", "--devices", "8", "--global-batch", "64", "--top", "3"],
        ["simulate", "--model", "gpt2-350m", "--dp", "2", "--pp", "2", "--microbatches", "4", "--global-batch", "16"],
        ["schedule", "--pp", "4", "--microbatches", "8", "--schedule", "interleaved", "--virtual-stages", "2"],
        ["explain", "--dp", "2", "--tp", "2", "--pp", "2", "--model", "tiny"],
        ["explain", "--tp", "2", "--hf", "llama", "--hf-config", '{"num_hidden_layers": 2, "hidden_size": 64, '
         '"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128}'],
    ]
    code = (
        "import contextlib, io, sys\n"
        "from paratrain.cli import main\n"
        f"for argv in {commands!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0, argv\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
