"""Request and response buffering (SPEC §10): memory first, then a spill file.

Three pieces, each usable on its own:

* ``Buffer`` holds bytes in memory up to ``max_memory`` and spills the rest to a temporary
  file, refusing writes that would take the total past ``max_size`` (``TooLarge``).  It reads
  back as an ``IBodyProducer`` that honours pause/resume, so a buffered body replays to the
  upstream (or the client) with the same flow control as a streamed one.
* ``buffer_request_body`` drains a client's request body into a ``Buffer`` before the upstream
  is contacted (stage P20).
* ``BufferingSink`` wraps a ``ResponseSink`` and holds the upstream's status, headers and body
  back until the exchange is done (stage P21), except for streams (SSE) and upgrades.

Disk I/O happens in the reactor thread, deliberately.  Spill files are written and read in
slices of at most ``CHUNK`` (64 KiB): the data arrives in socket-read sized pieces anyway, a
64 KiB ``write``/``pread`` into the page cache costs microseconds, and handing each slice to a
thread would cost more than the I/O itself while reordering writes.  What must not happen is
one giant call that stalls every other connection; the slicing bounds each call, and readback
yields to the reactor every ``TURN_BUDGET`` bytes even when the consumer never pushes back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from kamal_proxy.observe.events import debug

__all__ = [
    "CHUNK",
    "SPILL_PREFIX",
    "Buffer",
    "BufferingSink",
    "TooLarge",
    "buffer_request_body",
    "is_streaming_response",
]

SPILL_PREFIX = "proxy-buffer-"
CHUNK = 64 << 10
# Bytes a producer writes in one reactor turn before yielding (unless paused sooner).
TURN_BUDGET = 256 << 10


class TooLarge(Exception):
    """The body exceeds the configured maximum (requests: 413, responses: 500)."""

    def __init__(self, message: str = "maximum size exceeded") -> None:
        super().__init__(message)


class Buffer:
    """Bytes in memory up to ``max_memory``, the rest in a ``proxy-buffer-*`` temp file.

    ``max_size`` > 0 caps the total (memory + disk); a body of exactly ``max_size`` bytes
    fits.  ``max_memory`` 0 sends everything to disk.  ``close()`` must be called when the
    request ends, whatever happened: it removes the spill file (and is idempotent).
    """

    __slots__ = (
        "max_memory",
        "max_size",
        "size",
        "_memory",
        "_memory_size",
        "_file",
        "_closed",
        "_expected",
    )

    def __init__(self, max_memory: int, max_size: int, expected: int | None = None) -> None:
        """``expected``: the body's declared length, when known, to size memory once."""
        self.max_memory = max(0, max_memory)
        self._expected = expected or 0
        self.max_size = max_size
        self.size = 0
        # One growing bytearray rather than a list of chunks joined later: a join would hold
        # the chunks and their copy at once, twice --buffer-memory per request at its peak.
        self._memory = bytearray()
        self._memory_size = 0
        self._file: Any = None
        self._closed = False

    @property
    def spill_path(self) -> str | None:
        """The spill file's name while it exists."""
        f = self._file
        return f.name if f is not None else None

    @property
    def memory_size(self) -> int:
        return self._memory_size

    def write(self, data: bytes) -> None:
        """Append ``data``; raises ``TooLarge`` (writing nothing) past ``max_size``."""
        if self._closed:
            raise ValueError("write to a closed buffer")
        n = len(data)
        if not n:
            return
        if self.max_size > 0 and self.size + n > self.max_size:
            raise TooLarge()
        if self._file is None:
            room = self.max_memory - self._memory_size
            if n <= room:
                self._store(data)
                self.size += n
                return
            if room > 0:
                self._store(memoryview(data)[:room])
                self.size += room
                data = memoryview(data)[room:]
            self._spill()
        self._write_disk(data)

    def _store(self, data: Any) -> None:
        """Copy into memory, growing by doubling but never past ``max_memory`` (Python's own
        over-allocation would put up to an eighth more on top of the limit)."""
        start = self._memory_size
        end = start + len(data)
        memory = self._memory
        if end > len(memory):
            want = max(end, 2 * len(memory), 16 * 1024, self._expected)
            grown = bytearray(min(self.max_memory, want))
            grown[:start] = memoryview(memory)[:start]
            self._memory = memory = grown
        memory[start:end] = data
        self._memory_size = end

    def _spill(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix=SPILL_PREFIX, delete=False, buffering=0)
        debug("Buffer: spilling to disk", file=self._file.name)

    def _write_disk(self, data: Any) -> None:
        view = memoryview(data)
        write = self._file.write
        pos = 0
        end = len(view)
        while pos < end:
            written = write(view[pos : pos + CHUNK])
            if not written:
                raise OSError("short write to buffer spill file")
            pos += written
            self.size += written

    def read_chunk(self, offset: int, limit: int = CHUNK) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (memory first, then the spill file)."""
        if self._closed:
            raise ValueError("read from a closed buffer")
        memory_size = self._memory_size
        if offset < memory_size:
            return bytes(memoryview(self._memory)[offset : min(offset + limit, memory_size)])
        offset -= memory_size
        if self._file is None:
            return b""
        return os.pread(self._file.fileno(), limit, offset)

    def getvalue(self) -> bytes:
        """Everything written so far (tests and small bodies only)."""
        out = [bytes(memoryview(self._memory)[: self._memory_size])]
        pos = self._memory_size
        while pos < self.size:
            chunk = self.read_chunk(pos)
            if not chunk:
                break
            out.append(chunk)
            pos += len(chunk)
        return b"".join(out)

    def as_producer(self, *, unknown_length: bool = False, reactor: Any = None) -> BufferProducer:
        """An ``IBodyProducer`` replaying the current contents.

        Its ``length`` is ``size``, or ``UNKNOWN_LENGTH`` with ``unknown_length`` (to keep a
        chunked request chunked upstream, SPEC §10.2).  ``reactor`` schedules the next slice
        after a turn's budget; defaults to the global reactor.
        """
        return BufferProducer(self, UNKNOWN_LENGTH if unknown_length else self.size, reactor)

    def close(self) -> None:
        """Free memory and remove the spill file; safe to call any number of times."""
        if self._closed:
            return
        self._closed = True
        self._memory = bytearray()
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.close()
        finally:
            debug("Buffer: removing spill", file=f.name)
            try:
                os.unlink(f.name)
            except FileNotFoundError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:  # a last resort: never leave spill files behind
        f = getattr(self, "_file", None)
        if f is not None:
            try:
                f.close()
                os.unlink(f.name)
            except OSError:
                pass


@implementer(IBodyProducer, IPushProducer)
class BufferProducer:
    """Writes a ``Buffer``'s bytes to a consumer in slices, pausable, yielding between turns."""

    def __init__(self, buffer: Buffer, length: Any, reactor: Any = None) -> None:
        self.length = length
        self._buffer = buffer
        self._end = buffer.size
        self._offset = 0
        self._reactor = reactor
        self._consumer: Any = None
        self._d: Deferred[None] | None = None
        self._paused = False
        self._stopped = False
        self._pumping = False
        self._call: Any = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        if self._consumer is not None:
            raise RuntimeError("a buffer producer can be started only once")
        self._consumer = consumer
        self._d = d = Deferred()
        self._pump()
        return d

    def pauseProducing(self) -> None:
        self._paused = True
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def resumeProducing(self) -> None:
        if self._stopped or self._d is None:
            return
        self._paused = False
        if not self._pumping and self._call is None:
            self._pump()

    def stopProducing(self) -> None:
        """Stop writing; the ``startProducing`` Deferred never fires (``IBodyProducer``)."""
        self._stopped = True
        self._d = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _scheduled(self) -> None:
        self._call = None
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            budget = TURN_BUDGET
            buffer = self._buffer
            while not self._paused and not self._stopped and self._offset < self._end:
                if budget <= 0:
                    reactor = self._reactor
                    if reactor is None:
                        from twisted.internet import reactor  # type: ignore[no-redef]
                    self._call = reactor.callLater(0, self._scheduled)
                    return
                chunk = buffer.read_chunk(self._offset, min(CHUNK, self._end - self._offset))
                if not chunk:
                    raise OSError("buffer spill file is shorter than expected")
                self._offset += len(chunk)
                budget -= len(chunk)
                self._consumer.write(chunk)
        except Exception:
            d, self._d = self._d, None
            self._stopped = True
            if d is not None:
                d.errback(Failure())
            return
        finally:
            self._pumping = False
        if self._offset >= self._end and not self._stopped:
            d, self._d = self._d, None
            if d is not None:
                d.callback(None)


@implementer(IConsumer)
class _BodyReader:
    """The consumer ``buffer_request_body`` hands to the client's body producer."""

    def __init__(self, body: IBodyProducer, buffer: Buffer) -> None:
        self.body = body
        self.buffer = buffer
        self.result: Deferred[Buffer] = Deferred(self._cancel)
        self.done = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self.done:
            return
        try:
            self.buffer.write(data)
        except Exception:
            # Never raise into the channel that delivered the bytes: fail our Deferred.
            self._fail(Failure())

    def finished(self, _: object) -> None:
        if not self.done:
            self.done = True
            self.result.callback(self.buffer)

    def failed(self, failure: Failure) -> None:
        if not self.done:
            self.done = True
            self.buffer.close()
            self.result.errback(failure)

    def _fail(self, failure: Failure) -> None:
        self.done = True
        _stop(self.body)
        self.buffer.close()
        self.result.errback(failure)

    def _cancel(self, _: Deferred) -> None:
        # The client left or the target is draining: stop reading, drop the spill.
        if not self.done:
            self.done = True
            _stop(self.body)
            self.buffer.close()
            self.result.errback(Failure(CancelledError()))


def _stop(body: Any) -> None:
    try:
        body.stopProducing()
    except Exception:
        pass


def buffer_request_body(body: IBodyProducer, max_memory: int, max_size: int) -> Deferred[Buffer]:
    """Read all of ``body`` into a new ``Buffer`` (SPEC §10.2).

    Fires with the buffer (the caller must ``close()`` it when the request ends), or fails
    with ``TooLarge`` (answer 413), the channel's ``MalformedBody`` (400) or anything else
    (500).  On failure the producer is stopped and the buffer already closed.  Cancelling the
    Deferred stops the producer and closes the buffer too.  A declared ``Content-Length``
    above ``max_size`` fails at once, without reading a byte.
    """
    length = body.length
    buffer = Buffer(max_memory, max_size, expected=None if length is UNKNOWN_LENGTH else length)
    if max_size > 0 and length is not UNKNOWN_LENGTH and length > max_size:
        _stop(body)
        buffer.close()
        return fail(TooLarge())
    if length == 0:
        return succeed(buffer)
    reader = _BodyReader(body, buffer)
    try:
        started = body.startProducing(reader)
    except Exception:
        reader.failed(Failure())
        return reader.result
    started.addCallbacks(reader.finished, reader.failed)
    return reader.result


def is_streaming_response(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response switches response buffering to pass-through (SPEC §10.3).

    As Go's ``Header().Get``: the first ``Content-Type`` whose media type (the part before
    ``;``, untrimmed, case-sensitive) is ``text/event-stream``, or a first
    ``Transfer-Encoding`` value exactly ``chunked``.  The proxy strips the upstream's
    ``Transfer-Encoding`` before the sink sees the headers, so in practice only SSE bypasses.
    """
    content_type: bytes | None = None
    transfer_encoding: bytes | None = None
    for name, value in headers:
        n = len(name)
        if n == 12 and content_type is None and name.lower() == b"content-type":
            content_type = value
        elif n == 17 and transfer_encoding is None and name.lower() == b"transfer-encoding":
            transfer_encoding = value
    if content_type is not None and content_type.split(b";", 1)[0] == b"text/event-stream":
        return True
    return transfer_encoding == b"chunked"


# BufferingSink states.
_WAITING = 0  # nothing yet, or buffering the body
_BYPASS = 1  # streaming / upgraded: everything passes through
_FAILED = 2  # too large or a spill error: discard the rest
_DELIVERING = 3
_DONE = 4


@implementer(IPushProducer)
class BufferingSink:
    """A ``ResponseSink`` that holds the response back until ``finish()`` (SPEC §10.3).

    Usage by the pipeline (stage P21)::

        bs = BufferingSink(proxy_exchange, max_memory, max_size, on_too_large=...)
        bs.exchange = pool.forward(method, path, headers, body, bs, timeout=...)
        bs.exchange.done: on success -> bs.finish() (a Deferred), then finish the request;
                          on failure -> bs.close(), handle the error as usual

    * Informational (1xx) responses, ``101`` heads and ``upgraded()`` pass straight through.
    * A streaming response (``is_streaming_response``) passes through from its head on,
      with no size limit; ``finish()`` then has nothing left to do.
    * Past ``max_size`` the buffered response is discarded, nothing reaches the wrapped
      sink, ``on_too_large()`` is called once (the caller cancels the upstream and answers
      500) and ``finish()`` fails with ``TooLarge``.  Any other buffering error (disk) calls
      ``on_error(exc)`` likewise and ``finish()`` fails with it.

    It is also an ``IPushProducer``: register it with the client request instead of the
    exchange.  While streaming it forwards pause/resume to ``exchange``; while delivering a
    buffered body it pauses the delivery; while buffering it ignores them (the buffer
    absorbs the upstream's pace).
    """

    __slots__ = (
        "sink",
        "exchange",
        "max_memory",
        "max_size",
        "on_too_large",
        "on_error",
        "error",
        "_reactor",
        "_state",
        "_head",
        "_buffer",
        "_producer",
        "_paused",
    )

    def __init__(
        self,
        sink: Any,
        max_memory: int,
        max_size: int,
        on_too_large: Callable[[], object] | None = None,
        on_error: Callable[[Exception], object] | None = None,
        *,
        reactor: Any = None,
    ) -> None:
        self.sink = sink
        self.exchange: Any = None
        self.max_memory = max_memory
        self.max_size = max_size
        self.on_too_large = on_too_large
        self.on_error = on_error
        self.error: Exception | None = None
        self._reactor = reactor
        self._state = _WAITING
        self._head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None
        self._buffer: Buffer | None = None
        self._producer: BufferProducer | None = None
        self._paused = False

    @property
    def bypassed(self) -> bool:
        """True once the response streams through unbuffered (SSE, upgrade)."""
        return self._state == _BYPASS

    @property
    def buffered_size(self) -> int:
        buffer = self._buffer
        return buffer.size if buffer is not None else 0

    # -- ResponseSink ---------------------------------------------------------------

    def informational(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self._state in (_WAITING, _BYPASS):
            self.sink.informational(status, headers)

    def response_started(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        if self._state != _WAITING:
            return
        if status == 101 or is_streaming_response(headers):
            self._state = _BYPASS
            self.sink.response_started(status, reason, headers, length)
            return
        self._head = (status, reason, headers)
        self._buffer = Buffer(self.max_memory, self.max_size)

    def response_data(self, data: bytes) -> None:
        state = self._state
        if state == _BYPASS:
            self.sink.response_data(data)
            return
        buffer = self._buffer
        if state != _WAITING or buffer is None:
            return
        try:
            buffer.write(data)
        except Exception as exc:
            self._failed(exc)

    def upgraded(self, tunnel: Any) -> None:
        if self._state == _WAITING:
            self._state = _BYPASS
        self.sink.upgraded(tunnel)

    def _failed(self, exc: Exception) -> None:
        self._state = _FAILED
        self.error = exc
        self._discard()
        if isinstance(exc, TooLarge):
            if self.on_too_large is not None:
                self.on_too_large()
        elif self.on_error is not None:
            self.on_error(exc)

    # -- the end --------------------------------------------------------------------

    def finish(self) -> Deferred[None]:
        """Deliver the buffered response to the wrapped sink; fires when all was handed over.

        Calls ``sink.response_started(status, reason, headers, size)`` (``length`` is the
        buffered size) then ``sink.response_data`` in slices of at most 64 KiB.  Fails
        (delivering nothing) when buffering failed.  The buffer is closed afterwards.
        """
        state = self._state
        if state == _BYPASS or state == _DONE:
            self._state = _DONE
            return succeed(None)
        if state == _FAILED:
            return fail(self.error)
        if state == _DELIVERING:
            raise RuntimeError("finish() called twice")
        head, buffer = self._head, self._buffer
        if head is None or buffer is None:
            self._state = _DONE
            return fail(RuntimeError("the upstream response never started"))
        self._state = _DELIVERING
        status, reason, headers = head
        self.sink.response_started(status, reason, headers, buffer.size)
        if self._state != _DELIVERING:  # closed by the sink meanwhile
            return succeed(None)
        producer = buffer.as_producer(reactor=self._reactor)
        self._producer = producer
        if self._paused:
            producer.pauseProducing()
        d = producer.startProducing(_SinkWriter(self.sink))
        return d.addBoth(self._delivered)

    def _delivered(self, result: Any) -> Any:
        self._producer = None
        self._state = _DONE
        self._discard()
        return result

    def close(self) -> None:
        """Drop whatever is buffered (the exchange failed or the client left); idempotent."""
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if self._state != _FAILED:
            self._state = _DONE
        self._discard()

    def _discard(self) -> None:
        buffer = self._buffer
        if buffer is not None:
            buffer.close()

    # -- IPushProducer --------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._state == _BYPASS:
            if self.exchange is not None:
                self.exchange.pause()
        elif self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._state == _BYPASS:
            if self.exchange is not None:
                self.exchange.resume()
        elif self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        if self._state == _BYPASS and self.exchange is not None:
            self.exchange.cancel()
        self.close()


class _SinkWriter:
    """Adapts ``ResponseSink.response_data`` to the consumer a ``BufferProducer`` writes to."""

    __slots__ = ("write",)

    def __init__(self, sink: Any) -> None:
        self.write = sink.response_data
