"""kied: a daemon that sees KIE.ai generation tasks through to the end."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
