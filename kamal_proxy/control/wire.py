"""AMP without Twisted: the box format and the argument types the control contract uses.

The CLI is a short-lived process whose start-up time is the operator's wait, and importing
``twisted.protocols.amp`` (which pulls in OpenSSL) took most of it.  AMP itself is small: a box
is a sequence of keys and values, each preceded by its 16-bit big-endian length, and an empty
key ends the box.  A request carries ``_command`` and ``_ask`` (a tag), its answer ``_answer``
with the same tag, a failure ``_error``, ``_error_code`` and ``_error_description``.

:class:`Command` declares a command in AMP's own shape (``arguments``, ``response``,
``errors``), so ``control/commands.py`` stays the one place the contract is written.  The CLI
encodes and decodes boxes with this module alone; the server gets a real ``amp.Command`` built
from the same declaration (:meth:`Command.amp`), whose arguments are Twisted's own types, so a
test of the CLI against the server checks this codec against Twisted's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

ASK = b"_ask"
ANSWER = b"_answer"
COMMAND = b"_command"
ERROR = b"_error"
ERROR_CODE = b"_error_code"
ERROR_DESCRIPTION = b"_error_description"
MAX_KEY_LENGTH = 0xFF
MAX_VALUE_LENGTH = 0xFFFF

Box = dict[bytes, bytes]


class WireError(Exception):
    """A box that cannot be encoded, or bytes that are not a box."""


def encode_box(box: Mapping[bytes, bytes]) -> bytes:
    """One box on the wire (keys sorted, as Twisted sends them)."""
    out = bytearray()
    for key, value in sorted(box.items()):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise WireError(f"key of {len(key)} bytes: {key[:20]!r}")
        if len(value) > MAX_VALUE_LENGTH:
            raise WireError(f"value of {len(value)} bytes for {key!r}")
        out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    out += b"\x00\x00"
    return bytes(out)


class BoxReader:
    """Incremental decoder: feed it bytes as they arrive, get the complete boxes back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._box: Box = {}
        self._key: bytes | None = None

    def feed(self, data: bytes) -> list[Box]:
        self._buffer += data
        boxes: list[Box] = []
        while len(self._buffer) >= 2:
            length = int.from_bytes(self._buffer[:2], "big")
            if self._key is None and length == 0:
                del self._buffer[:2]
                boxes.append(self._box)
                self._box = {}
                continue
            if self._key is None and length > MAX_KEY_LENGTH:
                raise WireError(f"key of {length} bytes")
            if len(self._buffer) < 2 + length:
                break
            chunk = bytes(self._buffer[2 : 2 + length])
            del self._buffer[: 2 + length]
            if self._key is None:
                self._key = chunk
            else:
                self._box[self._key] = chunk
                self._key = None
        return boxes


def _python_name(name: bytes) -> str:
    """AMP's ``_wireNameToPythonIdentifier``."""
    return name.decode("ascii").replace("-", "_")


# -- argument types: the same bytes as twisted.protocols.amp's types of the same name ---------


class Argument:
    """One value of a box; :meth:`amp` gives the Twisted argument that reads and writes it.

    An ``optional`` argument may be left out (or given as None), as in AMP: that is how a
    command grows without breaking the other side, which neither sends nor expects it.
    """

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional

    def to_box(self, name: bytes, box: Box, value: Any) -> None:
        box[name] = self.to_wire(value)

    def from_box(self, name: bytes, box: Mapping[bytes, bytes]) -> Any:
        return self.from_wire(box[name])

    def to_wire(self, value: Any) -> bytes:
        raise NotImplementedError

    def from_wire(self, data: bytes) -> Any:
        raise NotImplementedError

    def amp(self) -> Any:
        """The equivalent ``twisted.protocols.amp`` argument (imports Twisted)."""
        raise NotImplementedError


class Unicode(Argument):
    def to_wire(self, value: str) -> bytes:
        return value.encode("utf-8")

    def from_wire(self, data: bytes) -> str:
        return data.decode("utf-8")

    def amp(self) -> Any:
        from twisted.protocols import amp

        return amp.Unicode(optional=self.optional)


class Integer(Argument):
    def to_wire(self, value: int) -> bytes:
        return b"%d" % (value,)

    def from_wire(self, data: bytes) -> int:
        return int(data)

    def amp(self) -> Any:
        from twisted.protocols import amp

        return amp.Integer(optional=self.optional)


class Boolean(Argument):
    def to_wire(self, value: bool) -> bytes:
        return b"True" if value else b"False"

    def from_wire(self, data: bytes) -> bool:
        if data == b"True":
            return True
        if data == b"False":
            return False
        raise WireError(f"bad boolean value: {data!r}")

    def amp(self) -> Any:
        from twisted.protocols import amp

        return amp.Boolean(optional=self.optional)


class ListOf(Argument):
    """Elements each preceded by their 16-bit length, in one value."""

    def __init__(self, element: Argument, optional: bool = False) -> None:
        super().__init__(optional)
        self.element = element

    def to_wire(self, value: list[Any]) -> bytes:
        out = bytearray()
        for item in value:
            data = self.element.to_wire(item)
            if len(data) > MAX_VALUE_LENGTH:
                raise WireError(f"list element of {len(data)} bytes")
            out += len(data).to_bytes(2, "big") + data
        return bytes(out)

    def from_wire(self, data: bytes) -> list[Any]:
        items = []
        view = memoryview(data)
        while view:
            if len(view) < 2:
                raise WireError("truncated list")
            length = int.from_bytes(view[:2], "big")
            if len(view) < 2 + length:
                raise WireError("truncated list element")
            items.append(self.element.from_wire(bytes(view[2 : 2 + length])))
            view = view[2 + length :]
        return items

    def amp(self) -> Any:
        from twisted.protocols import amp

        return amp.ListOf(self.element.amp(), optional=self.optional)


class BigUnicode(Argument):
    """Text of any length: AMP caps one value at 64 KiB, so long text spans numbered keys.

    ``name`` holds the number of chunks, ``name.0``, ``name.1``... the UTF-8 bytes.
    """

    CHUNK = MAX_VALUE_LENGTH

    def to_box(self, name: bytes, box: Box, value: str) -> None:
        data = value.encode("utf-8")
        chunks = [data[i : i + self.CHUNK] for i in range(0, len(data), self.CHUNK)] or [b""]
        box[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            box[name + b"." + str(i).encode("ascii")] = chunk

    def from_box(self, name: bytes, box: Mapping[bytes, bytes]) -> str:
        count = int(box[name])
        data = b"".join(box[name + b"." + str(i).encode("ascii")] for i in range(count))
        return data.decode("utf-8")

    def amp(self) -> Any:
        return _amp_big_unicode(self)


def _amp_big_unicode(big: BigUnicode) -> Any:
    from twisted.protocols import amp

    class AMPBigUnicode(amp.Argument):
        def toBox(self, name, strings, objects, proto):
            value = objects.get(_python_name(name))
            if value is not None or not self.optional:
                big.to_box(name, strings, objects[_python_name(name)])

        def fromBox(self, name, strings, objects, proto):
            present = name in strings
            objects[_python_name(name)] = big.from_box(name, strings) if present else None

    return AMPBigUnicode(optional=big.optional)


# -- commands ---------------------------------------------------------------------------------


class Command:
    """An AMP command declared as data, in the shape of ``amp.Command``.

    ``arguments`` and ``response`` list ``(wire name, Argument)``; ``errors`` maps exception
    classes to error codes; ``commandName`` defaults to the class name.  A command with
    ``requiresAnswer = False`` is a notification: its box has no ``_ask`` and gets no answer.
    """

    commandName: ClassVar[bytes]
    arguments: ClassVar[list[tuple[bytes, Argument]]] = []
    response: ClassVar[list[tuple[bytes, Argument]]] = []
    errors: ClassVar[dict[type[Exception], bytes]] = {}
    requiresAnswer: ClassVar[bool] = True

    _amp: ClassVar[Any] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "commandName" not in cls.__dict__:
            cls.commandName = cls.__name__.encode("ascii")
        cls._amp = None

    # -- the CLI's side (no Twisted) ----------------------------------------------------------

    @classmethod
    def request(cls, tag: bytes, values: Mapping[str, Any]) -> bytes:
        """The encoded request box for ``values`` (keyword names, as for ``callRemote``)."""
        names = {_python_name(name) for name, _ in cls.arguments}
        required = {_python_name(name) for name, a in cls.arguments if not a.optional}
        unknown = sorted(set(values) - names)
        missing = sorted(required - set(values))
        if unknown or missing:
            raise TypeError(
                f"{cls.__name__}: unknown arguments {unknown}, missing arguments {missing}"
            )
        box: Box = {COMMAND: cls.commandName}
        if cls.requiresAnswer:
            box[ASK] = tag
        for name, argument in cls.arguments:
            value = values.get(_python_name(name))
            if value is not None or not argument.optional:
                argument.to_box(name, box, values[_python_name(name)])
        return encode_box(box)

    @classmethod
    def parse_arguments(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        """The keyword values of a request box (a notification the server sent, say);
        an optional argument left out is None."""
        return _parse(cls.arguments, box)

    @classmethod
    def parse_response(cls, box: Mapping[bytes, bytes]) -> dict[str, Any]:
        return _parse(cls.response, box)

    # -- the server's side ------------------------------------------------------------------

    @classmethod
    def amp(cls) -> Any:
        """The ``twisted.protocols.amp.Command`` with this declaration (built once)."""
        if cls._amp is None:
            from twisted.protocols import amp

            attributes = {
                "__module__": cls.__module__,
                "__doc__": cls.__doc__,
                "commandName": cls.commandName,
                "arguments": [(name, argument.amp()) for name, argument in cls.arguments],
                "response": [(name, argument.amp()) for name, argument in cls.response],
                "errors": dict(cls.errors),
                "requiresAnswer": cls.requiresAnswer,
            }
            cls._amp = type(cls.__name__, (amp.Command,), attributes)
        return cls._amp

    @classmethod
    def responder(cls, function: Any) -> Any:
        """``amp.Command.responder`` of :meth:`amp`, so a responder reads as in plain AMP."""
        return cls.amp().responder(function)


def _parse(arguments: list[tuple[bytes, Argument]], box: Mapping[bytes, bytes]) -> dict[str, Any]:
    values = {}
    for name, argument in arguments:
        if argument.optional and name not in box:
            values[_python_name(name)] = None
        else:
            values[_python_name(name)] = argument.from_box(name, box)
    return values
