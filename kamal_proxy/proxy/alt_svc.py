"""``Alt-Svc`` on the TCP HTTPS listener while HTTP/3 is on (SPEC §4.1 step 5, stage P1).

Browsers learn of HTTP/3 from this header and try QUIC on their next connection.  It goes on
every response of the HTTPS listener, HTTP/1.1 and HTTP/2 alike, proxied or not: the request
class sets it before the pipeline runs (so an upgrade's ``101`` carries it too) and again as
the head is written (error pages start from empty headers).  Plain HTTP and HTTP/3 responses
are made by other request classes and never carry it.
"""

from __future__ import annotations

from kamal_proxy.proxy.webrequest import StreamingRequest

#: Thirty days, as the Go original (quic-go's ``http3.Server.SetQUICHeaders``).
MAX_AGE = 2592000


def alt_svc_value(port: int) -> bytes:
    return b'h3=":%d"; ma=%d' % (port, MAX_AGE)


def alt_svc_request(port: int) -> type[StreamingRequest]:
    """A request class for the HTTPS ``Site`` whose responses advertise h3 on ``port``."""
    value = [alt_svc_value(port)]

    class AltSvcRequest(StreamingRequest):
        def process(self) -> None:
            self.responseHeaders.setRawHeaders(b"alt-svc", list(value))
            super().process()

        def write(self, data: bytes) -> None:
            if not self.startedWriting and not self.responseHeaders.hasHeader(b"alt-svc"):
                self.responseHeaders.setRawHeaders(b"alt-svc", list(value))
            StreamingRequest.write(self, data)

    return AltSvcRequest
