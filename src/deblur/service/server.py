"""``python -m deblur.service``: the HTTP service as one uvicorn worker on this machine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from deblur.core.config import ServingConfig
from deblur.core.runtime_env import prefer_passive_openmp
from deblur.service.app import create_app
from deblur.service.errors import ApiError, error_body
from deblur.service.logs import RedactSecrets, uvicorn_log_config

log = logging.getLogger("deblur.service")

# glibc hands large freed blocks back to the OS, so every tile batch faults its activation
# buffers in anew: 20-40 % of the CPU time of a request on this machine. These keep blocks
# up to 256 MB in the heap. glibc reads them at process start only (on Azure: app settings).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def restart_with_malloc_settings(argv: list[str]) -> None:
    """Re-execute this command once with MALLOC_ENV added (values already set are kept)."""
    if sys.platform != "linux" or all(k in os.environ for k in MALLOC_ENV):
        return
    env = {**MALLOC_ENV, **os.environ}
    os.execve(sys.executable, [sys.executable, "-m", "deblur.service", *argv], env)


PARSED_BYTES = re.compile(r": (?:bytearray|bytes)?\(?b['\"].*$", re.DOTALL)   # h11 quotes the offending line
BODY_GRACE_SECONDS = 1.0  # the app answers a late body with 408 first; this cuts bodies no route reads


class ErrorRememberingConnection(h11.Connection):
    """h11's server connection, remembering the protocol error it raised (uvicorn's handler drops it)."""

    protocol_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as err:
            self.protocol_error = err
            raise


class SlowClientTimeouts(H11Protocol):
    """uvicorn's HTTP/1.1 connection with deadlines for a request being received (uvicorn has none),
    and the project's JSON error for a request that is not valid HTTP/1.1 (uvicorn answers plain text).

    Headers: the request line and headers must be complete ``header_timeout`` seconds after the
    connection opens, or after the first byte of the next request on a kept-alive connection
    (uvicorn's ``timeout_keep_alive`` bounds the idle time in between). Body: a body still
    arriving ``body_timeout`` + ``BODY_GRACE_SECONDS`` after its headers is cut; a route that reads
    the body (``deblur.service.decoding.read_body``) answers 408 at ``body_timeout`` before that.
    A connection past its deadline is closed without an answer.
    """

    header_timeout = 10.0
    body_timeout = 120.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self.conn = ErrorRememberingConnection(h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (e.g. ``Content-Length: abc``), as JSON ``bad_request``."""
        err = self.conn.protocol_error
        why = PARSED_BYTES.sub("", str(err)) if err is not None else msg.rstrip(".")   # never echo request bytes
        error = ApiError(400, "bad_request", f"the request is not valid HTTP/1.1 ({why}); it was not processed and "
                         "the connection is closed: send a well-formed request")
        body = error_body(error)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None
        super().connection_made(transport)
        self._expect("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for is None and self.conn.their_state is h11.IDLE:
            self._expect("headers")          # the first byte of the next request
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            waiting_for = "body"
        elif state is h11.IDLE and (self._waiting_for == "headers" or self.conn.trailing_data[0]):
            waiting_for = "headers"
        else:
            waiting_for = None
        if waiting_for != self._waiting_for:
            self._expect(waiting_for)

    def _expect(self, what: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._waiting_for = what
        if what == "headers":
            self._deadline = self.loop.call_later(self.header_timeout, self._too_slow, what, self.header_timeout)
        elif what == "body":
            seconds = self.body_timeout + BODY_GRACE_SECONDS
            self._deadline = self.loop.call_later(seconds, self._too_slow, what, seconds)

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        setting = ("serving.header_timeout_seconds" if what == "headers"
                   else f"serving.body_timeout_seconds + {BODY_GRACE_SECONDS:g} s")
        log.info("closed the connection from %s: request %s not complete within %g s (%s)", client, what, seconds,
                 setting)
        self.transport.close()


def timed_protocol(serving: ServingConfig) -> type[SlowClientTimeouts]:
    """``SlowClientTimeouts`` with the header and body timeouts of ``serving``, for ``uvicorn.run(http=...)``."""
    return type("DeblurHttpProtocol", (SlowClientTimeouts,), {
        "header_timeout": serving.header_timeout_seconds, "body_timeout": serving.body_timeout_seconds})


def main(argv: list[str] | None = None) -> None:
    """Serve the app with uvicorn on one worker."""
    prefer_passive_openmp()   # before the model (and torch) loads; also kept across the malloc restart below
    parser = argparse.ArgumentParser(prog="python -m deblur.service",
                                     description="Serve the deblurring HTTP API and web page.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--model-dir", default=None, help="serving artifact folder (default: from the environment)")
    parser.add_argument("--no-preload", action="store_true", help="load the model on the first request")
    parser.add_argument("--keep-malloc", action="store_true", help="do not restart with MALLOC_ENV (see source)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.keep_malloc:
        restart_with_malloc_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    app = create_app(args.model_dir, preload=not args.no_preload)
    print(f"deblur: serving http://{args.host}:{args.port}/ (model: {app.state.holder.source.describe()})", flush=True)
    # SIGTERM: running requests stop themselves after the grace (deblur.service.admission.Shutdown);
    # a few seconds later uvicorn cancels whatever is still open and exits
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="info", log_config=uvicorn_log_config(),
                http=timed_protocol(app.state.serving),
                timeout_graceful_shutdown=int(app.state.serving.shutdown_grace_seconds) + 3)
