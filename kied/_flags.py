"""Command-line flag values for ``kied simulate`` and ``kied demo``, with errors naming the flag."""

from __future__ import annotations

import argparse
import math
import re
from typing import NoReturn

from kied.errors import ConfigError

__all__ = ["FlagParser", "parse_duration", "parse_integer", "parse_number"]


class FlagParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are ``ConfigError`` naming the flag."""

    def error(self, message: str) -> NoReturn:
        if m := re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message):
            raise ConfigError(m[1], m[2])
        if m := re.match(r"unrecognized arguments: (\S+)", message):
            raise ConfigError(m[1], f"unknown flag (see {self.prog} --help)")
        raise ConfigError("arguments", message)


def parse_number(flag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(flag, f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(flag, f"must be a finite number, not {text!r}")
    return value


def parse_integer(flag: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(flag, f"must be a whole number, not {text!r}") from None


_SECONDS = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"


def parse_duration(flag: str, text: str) -> tuple[float, float]:
    """``SECONDS`` or ``MIN-MAX``, as ``(MIN, MAX)`` with ``0 <= MIN <= MAX``."""
    if m := re.fullmatch(_SECONDS, text):
        return float(m[1]), float(m[1])
    if (m := re.fullmatch(f"{_SECONDS}-{_SECONDS}", text)) and float(m[1]) <= float(m[2]):
        return float(m[1]), float(m[2])
    raise ConfigError(flag, f"must be SECONDS or MIN-MAX with 0 <= MIN <= MAX, not {text!r}")
