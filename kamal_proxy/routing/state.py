"""The state file (SPEC §15): every service's options, targets and controllers as JSON.

The layout is the Go original's, key for key, so a state file written by a Go kamal-proxy is
a drop-in start and ours can be read back by it.  Reading follows Go's ``encoding/json``
rules where they matter for real files: missing or ``null`` keys take zero values, unknown
keys are ignored, a value of the wrong JSON type is an error, anything after the top-level
array is ignored (Go's ``Decoder.Decode`` reads one value).  Unlike Go, every failure is a
:class:`StateError`, and a bad file is moved aside instead of being overwritten by the next
save.

Writing is atomic (temporary file in the same directory, fsync, rename, fsync of the
directory) and the file is created with mode 0600 because it holds key file paths.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from kamal_proxy.service_options import (
    HealthCheckConfig,
    ServiceOptions,
    TargetOptions,
)

PAUSE_RUNNING = 0
PAUSE_PAUSED = 1
PAUSE_STOPPED = 2
_PAUSE_STATES = (PAUSE_RUNNING, PAUSE_PAUSED, PAUSE_STOPPED)

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


class StateError(Exception):
    """The state file could not be read, decoded or written; ``str()`` says why.

    ``kept_at`` is where a bad file was moved aside by :func:`load` (None otherwise).
    """

    def __init__(self, message: str, kept_at: str | None = None) -> None:
        super().__init__(message)
        self.kept_at = kept_at


class StateReadError(StateError):
    """The file exists but could not be read (SPEC: ``Failed to restore saved state``)."""


@dataclass(slots=True)
class ServiceState:
    """One service as persisted: what is needed to rebuild it without health-check waits.

    ``options`` are normalized and carry the inherited TLS settings (§6.5).  ``active_*`` are
    always lists (Go writes them as arrays); ``rollout_*`` are None when the service has no
    rollout load balancer.  ``rollout`` is None or ``{"percentage": int,
    "percentage_split_point": float, "allowlist": list[str]}``; the split point is used as
    stored, never recomputed.
    """

    name: str
    options: ServiceOptions = field(default_factory=ServiceOptions)
    target_options: TargetOptions = field(default_factory=TargetOptions)
    active_targets: list[str] = field(default_factory=list)
    active_readers: list[str] = field(default_factory=list)
    rollout_targets: list[str] | None = None
    rollout_readers: list[str] | None = None
    pause_state: int = PAUSE_RUNNING
    stop_message: str = ""
    fail_after: int = 0
    rollout: dict[str, Any] | None = None


# -- encoding ---------------------------------------------------------------------------------

# Go's encoder escapes these inside strings; they can only occur inside strings here.
_GO_ESCAPES = (
    ("&", "\\u0026"),
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def _go_float(value: float) -> float | int:
    """Write integral floats as Go does (``858993459``, not ``858993459.0``)."""
    if math.isfinite(value) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def _service_json(state: ServiceState) -> dict[str, Any]:
    rollout = None
    if state.rollout is not None:
        rollout = {
            "percentage": int(state.rollout.get("percentage", 0)),
            "percentage_split_point": _go_float(
                float(state.rollout.get("percentage_split_point", 0.0))
            ),
            "allowlist": list(state.rollout.get("allowlist") or []) or None,
        }
    return {
        "name": state.name,
        "options": state.options.to_json(),
        "target_options": state.target_options.to_json(),
        "active_targets": list(state.active_targets or []),
        "active_readers": list(state.active_readers or []),
        "rollout_targets": None if state.rollout_targets is None else list(state.rollout_targets),
        "rollout_readers": None if state.rollout_readers is None else list(state.rollout_readers),
        "pause_controller": {
            "state": state.pause_state,
            "stop_message": state.stop_message,
            "fail_after": state.fail_after,
        },
        "rollout_controller": rollout,
    }


def encode(states: Iterable[ServiceState]) -> bytes:
    """The file contents: a compact JSON array plus a newline, keys in §15.2 order."""
    try:
        text = json.dumps(
            [_service_json(s) for s in states],
            ensure_ascii=False,
            allow_nan=False,
            separators=(",", ":"),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise StateError(f"unable to encode state: {e}") from e
    for char, escape in _GO_ESCAPES:
        if char in text:
            text = text.replace(char, escape)
    # A lone surrogate (only possible from surrogate-escaped input) becomes a JSON \u escape.
    return (text + "\n").encode("utf-8", "backslashreplace")


# -- decoding ---------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shape_error(where: str, expected: str, value: Any) -> StateError:
    return StateError(f"cannot decode {_type_name(value)} into {where} (expected {expected})")


def _object(value: Any, where: str) -> dict[str, Any]:
    """An object, or ``{}`` for null/missing."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _shape_error(where, "object", value)
    return value


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _shape_error(where, "string", value)
    return value


def _bool(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _shape_error(where, "bool", value)
    return value


def _int(value: Any, where: str) -> int:
    if value is None:
        return 0
    # Go refuses 1.0 and 1e3 for an integer field, and bools everywhere but bool fields.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _shape_error(where, "integer", value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise StateError(f"number {value} overflows {where}")
    return value


def _float(value: Any, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _shape_error(where, "number", value)
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise StateError(f"number out of range for {where}")
    return result


def _str_list(value: Any, where: str) -> list[str] | None:
    """A list of strings (null items become ``""`` as in Go), or None for null/missing."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _shape_error(where, "array of strings", value)
    return [_str(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _checked_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Type-check the known keys of ``data`` against ``cls``'s defaults; drop the rest.

    The expected JSON type of each field comes from the dataclass default, so a field the
    options model gains later is checked without touching this module.  Null values are
    dropped, which leaves the model's ``from_json`` to apply its zero value.
    """
    sample = cls()
    out: dict[str, Any] = {}
    for f in fields(cls):
        value = data.get(f.name)
        if value is None:
            continue
        key = f"{where}.{f.name}"
        default = getattr(sample, f.name)
        if isinstance(default, bool):
            out[f.name] = _bool(value, key)
        elif isinstance(default, int):
            out[f.name] = _int(value, key)
        elif isinstance(default, float):
            out[f.name] = _float(value, key)
        elif isinstance(default, str):
            out[f.name] = _str(value, key)
        elif isinstance(default, list):
            out[f.name] = _str_list(value, key)
        elif isinstance(default, HealthCheckConfig):
            out[f.name] = _checked_fields(HealthCheckConfig, _object(value, key), key)
        else:  # pragma: no cover - a new kind of field in the options model
            raise StateError(f"unsupported field {key}")
    return out


def _service_from_json(data: Any, where: str) -> ServiceState:
    if not isinstance(data, dict):
        raise _shape_error(where, "object", data)
    name = _str(data.get("name"), f"{where}.name")
    options_json = _checked_fields(
        ServiceOptions, _object(data.get("options"), f"{where}.options"), f"{where}.options"
    )
    target_json = _checked_fields(
        TargetOptions,
        _object(data.get("target_options"), f"{where}.target_options"),
        f"{where}.target_options",
    )
    active_targets = _str_list(data.get("active_targets"), f"{where}.active_targets") or []
    active_readers = _str_list(data.get("active_readers"), f"{where}.active_readers") or []
    rollout_targets = _str_list(data.get("rollout_targets"), f"{where}.rollout_targets")
    rollout_readers = _str_list(data.get("rollout_readers"), f"{where}.rollout_readers")

    # Legacy layouts (§15.2): single targets and top-level routing keys.
    legacy_active = _str(data.get("active_target"), f"{where}.active_target")
    legacy_rollout = _str(data.get("rollout_target"), f"{where}.rollout_target")
    legacy_hosts = _str_list(data.get("hosts"), f"{where}.hosts")
    legacy_prefixes = _str_list(data.get("path_prefixes"), f"{where}.path_prefixes")
    if not active_targets and legacy_active:
        active_targets = [legacy_active]
    if not rollout_targets and legacy_rollout:
        rollout_targets = [legacy_rollout]
    if not options_json.get("hosts") and legacy_hosts:
        options_json["hosts"] = legacy_hosts
    if not options_json.get("path_prefixes") and legacy_prefixes:
        options_json["path_prefixes"] = legacy_prefixes

    pause = _object(data.get("pause_controller"), f"{where}.pause_controller")
    pause_state = _int(pause.get("state"), f"{where}.pause_controller.state")
    if pause_state not in _PAUSE_STATES:
        raise StateError(f"{where}.pause_controller.state must be 0, 1 or 2, not {pause_state}")

    rollout = None
    rollout_json = data.get("rollout_controller")
    if rollout_json is not None:
        rollout_json = _object(rollout_json, f"{where}.rollout_controller")
        rc = f"{where}.rollout_controller"
        rollout = {
            "percentage": _int(rollout_json.get("percentage"), f"{rc}.percentage"),
            "percentage_split_point": _float(
                rollout_json.get("percentage_split_point"), f"{rc}.percentage_split_point"
            ),
            "allowlist": _str_list(rollout_json.get("allowlist"), f"{rc}.allowlist") or [],
        }

    try:
        options = ServiceOptions.from_json(options_json).normalized()
        target_options = TargetOptions.from_json(target_json)
    except (TypeError, ValueError) as e:  # pragma: no cover - shapes were checked above
        raise StateError(f"invalid {where}: {e}") from e

    return ServiceState(
        name=name,
        options=options,
        target_options=target_options,
        active_targets=active_targets,
        active_readers=active_readers,
        rollout_targets=rollout_targets,
        rollout_readers=rollout_readers,
        pause_state=pause_state,
        stop_message=_str(pause.get("stop_message"), f"{where}.pause_controller.stop_message"),
        fail_after=_int(pause.get("fail_after"), f"{where}.pause_controller.fail_after"),
        rollout=rollout,
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON literal {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def decode(data: bytes) -> list[ServiceState]:
    """Parse a state file; raise :class:`StateError` (and nothing else) when it is bad.

    Options are normalized (§6.1) and legacy keys applied, so the result is ready to rebuild
    services from.  A top-level ``null`` means no services, as in Go.
    """
    try:
        text = bytes(data).decode("utf-8", "replace")
        start = len(text) - len(text.lstrip(" \t\r\n"))
        value, _end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError, TypeError) as e:
        raise StateError(f"invalid JSON: {e}") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise _shape_error("the service list", "array", value)
    try:
        return [_service_from_json(item, f"service[{i}]") for i, item in enumerate(value)]
    except RecursionError as e:  # pragma: no cover - the checks above are not recursive
        raise StateError(f"invalid state: {e}") from None


# -- the file -------------------------------------------------------------------------------


def save(path: str, states: Iterable[ServiceState]) -> None:
    """Replace the state file atomically with one write; raise :class:`StateError` on failure.

    The temporary file is created in the target directory (so the rename cannot cross file
    systems) with mode 0600, flushed to disk before the rename, and the directory is synced
    after it so the rename itself survives a crash.
    """
    data = encode(states)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
    except OSError as e:
        raise StateError(f"unable to create temporary state file: {e}") from e
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StateError(f"unable to write state file: {e}") from e
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Best effort: some file systems refuse to fsync a directory; the data is safe anyway."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def load(path: str, now: Callable[[], datetime] = _utc_now) -> list[ServiceState] | None:
    """Read and decode the state file; None when there is none.

    A file that cannot be read or decoded is renamed to ``<path>.corrupt-<UTC timestamp>``
    (never overwriting an earlier one) so the next save cannot destroy it, and
    :class:`StateError` (:class:`StateReadError` for read failures) is raised naming where
    it was kept.  ``now`` is injectable for tests.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        kept_at, note = _move_aside(path, now)
        raise StateReadError(f"unable to read state file: {e}; {note}", kept_at) from e
    try:
        return decode(data)
    except StateError as e:
        kept_at, note = _move_aside(path, now)
        raise StateError(f"{e}; {note}", kept_at) from None


def _move_aside(path: str, now: Callable[[], datetime]) -> tuple[str | None, str]:
    stamp = now().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = f"{path}.corrupt-{stamp}"
    for attempt in range(1000):
        candidate = base if attempt == 0 else f"{base}.{attempt}"
        if os.path.lexists(candidate):
            continue
        try:
            os.rename(path, candidate)
        except OSError as e:
            return None, f"the file could not be moved aside: {e}"
        return candidate, f"the file was kept as {candidate}"
    return None, "the file could not be moved aside: too many earlier corrupt copies"
