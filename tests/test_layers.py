"""The service's layers import one way: http -> serving -> model, and the model layer is torch-free.

Each layer's modules are imported in a fresh interpreter in which the layers above it, and the
frameworks only those layers may use, cannot be imported at all: an import that points upward
fails the test, whether it sits at the top of a module or is reached through another module.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import service

ROOT = Path(__file__).resolve().parents[1]

# what each layer may not import (modules and packages, with everything under them)
FORBIDDEN = {
    "service.model": [
        "service.serving", "service.http", "service.settings", "service.cli",
        "fastapi", "starlette", "uvicorn", "prometheus_client", "anyio", "torch",
    ],
    "service.serving": [
        "service.http", "service.settings", "service.cli",
        "fastapi", "starlette", "uvicorn", "prometheus_client", "torch",
    ],
    "service.http": ["service.cli", "uvicorn", "torch"],
}  # fmt: skip

_BLOCKER = """
import importlib, importlib.abc, sys
FORBIDDEN = {forbidden!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
            raise ImportError(f"layer violation: {{name}} imported")
        return None
sys.meta_path.insert(0, Blocker())
for module in {modules!r}:
    importlib.import_module(module)
print("ok", len({modules!r}))
"""


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [
        f"{package}.{info.name}" for info in pkgutil.iter_modules([str(path)]) if not info.ispkg
    ]


def _import_with_blocked(modules: list[str], forbidden: list[str]) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(forbidden=forbidden, modules=modules)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    modules = _modules(layer)
    assert len(modules) > 3, modules
    result = _import_with_blocked(modules, FORBIDDEN[layer])
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_check_catches_an_upward_import() -> None:
    """The blocker is not a no-op: the HTTP layer needs the serving layer, and is refused it."""
    result = _import_with_blocked(["service.http.app"], ["service.serving"])
    assert result.returncode != 0
    assert "layer violation: service.serving" in result.stderr


def test_every_service_module_sits_in_a_layer() -> None:
    """Besides the three layers, only the entry points and the settings live at the top."""
    top = {info.name for info in pkgutil.iter_modules(service.__path__)}
    assert top == {"model", "serving", "http", "settings", "cli", "__main__"}


def test_no_module_passes_about_400_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in (ROOT / "service").rglob("*.py")
    }
    assert max(lengths.values()) <= 420, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]
