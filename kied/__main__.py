"""``python -m kied`` runs the ``kied`` command."""

from __future__ import annotations

from kied.cli import main

__all__: list[str] = []

raise SystemExit(main())
