"""Named log calls for the server's own events (SPEC §17.3); the JSON writer is in log.py."""

from __future__ import annotations

from typing import Any


def _emit(level: str, msg: str, attrs: dict[str, Any]) -> None:
    from kamal_proxy.observe.log import emit

    emit(level, msg, **attrs)


def debug(msg: str, **attrs: Any) -> None:
    _emit("DEBUG", msg, attrs)


def info(msg: str, **attrs: Any) -> None:
    _emit("INFO", msg, attrs)


def warn(msg: str, **attrs: Any) -> None:
    _emit("WARN", msg, attrs)


def error(msg: str, **attrs: Any) -> None:
    _emit("ERROR", msg, attrs)
