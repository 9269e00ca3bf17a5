"""Every module declares its public surface in ``__all__``, and ``__all__`` is exactly it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import kied

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(kied.__path__, prefix="kied.")
    if info.name != "kied.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_names_defined_here(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported = set(module.__all__)
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.__all__ names {symbol!r}, which does not exist"
    defined = {
        symbol
        for symbol, value in vars(module).items()
        if not symbol.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    }
    missing = defined - exported
    assert not missing, f"{name} defines public {sorted(missing)} but does not export them"


def test_the_core_imports_no_io_library():
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, kied.core as core\n"
        "for info in pkgutil.walk_packages(core.__path__, prefix='kied.core.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(sorted(m for m in ('trio', 'quart', 'quart_trio', 'hypercorn', 'httpx', 'psycopg', 'sqlite3')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
