"""Layer contracts.

The scheduling core imports no store, API or service module (SPEC §2); the worker agent imports
nothing from the router's API (the HTTP plumbing both use lives in ``http/``); the API reaches the
core and the store only through the ``Runtime`` (no ``runtime.router.…`` or ``runtime.engine.…``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gpu_request_router

PACKAGE = Path(gpu_request_router.__file__).parent
CORE_MAY_NOT_IMPORT = ("store", "api", "services")
WORKER_MAY_NOT_IMPORT = ("api",)


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, relative imports resolved."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden_imports(path: Path, layer: str, may_not_import: tuple[str, ...]) -> list[str]:
    """The modules of ``may_not_import`` that ``path`` (a module of ``layer``) imports."""
    forbidden = tuple(f"gpu_request_router.{other}" for other in may_not_import)
    return sorted(
        name
        for name in imported_modules(path.read_text(), f"gpu_request_router.{layer}")
        if any(name == other or name.startswith(f"{other}.") for other in forbidden)
    )


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda path: path.name
)
def test_the_core_imports_no_store_api_or_service_module(path: Path) -> None:
    """A core module names no module of store/, api/ or services/, even lazily in a function."""
    found = forbidden_imports(path, "core", CORE_MAY_NOT_IMPORT)
    assert found == [], f"core/{path.name} imports {found}"


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "worker").glob("*.py")), ids=lambda path: path.name
)
def test_the_worker_imports_no_api_module(path: Path) -> None:
    """A worker module names no module of api/, even lazily in a function."""
    found = forbidden_imports(path, "worker", WORKER_MAY_NOT_IMPORT)
    assert found == [], f"worker/{path.name} imports {found}"


def test_the_contract_sees_imports_of_every_form() -> None:
    """The checker finds plain, from- and relative imports (so the contract can fail)."""
    source = "import gpu_request_router.api.app\nfrom ..store import memory\nfrom . import engine\n"
    names = imported_modules(source, "gpu_request_router.core")
    assert "gpu_request_router.api.app" in names
    assert "gpu_request_router.store.memory" in names
    assert "gpu_request_router.core.engine" in names


RUNTIME_INSIDES = ("router", "engine", "store", "writer")


def reaches_past_the_runtime(source: str) -> list[str]:
    """Every ``runtime.<inside>`` chain of ``source`` (``<inside>`` among RUNTIME_INSIDES)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in RUNTIME_INSIDES:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name == "runtime":
                found.append(f"line {node.lineno}: runtime.{node.attr}")
    return found


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "api").rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE))
)
def test_the_api_reaches_the_core_only_through_the_runtime(path: Path) -> None:
    """An API module calls the Runtime's methods, never into its router, engine or store."""
    found = reaches_past_the_runtime(path.read_text())
    assert found == [], f"{path.relative_to(PACKAGE)}: {found}"


def test_the_runtime_contract_sees_every_chain() -> None:
    """The checker finds ``service.runtime.router.x`` and ``runtime.engine.y`` alike."""
    source = "a = service.runtime.router.monitor\nb = runtime.engine.store\nc = runtime.get(1)\n"
    assert reaches_past_the_runtime(source) == ["line 1: runtime.router", "line 2: runtime.engine"]
