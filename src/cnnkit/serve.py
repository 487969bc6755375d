"""`serve`: a trained model over HTTP (FastAPI + uvicorn), with a web page to try it.

POST /predict (multipart images) answers in `cnnkit predict --json` format; GET /model,
GET /healthz, GET /metrics (Prometheus), GET /openapi.json; GET / is a page that needs
nothing from the internet.

Concurrent requests are batched dynamically, as TorchServe and Triton do: uploads are
decoded in a thread pool, and one inference thread runs whatever images are waiting as one
batch. Every status code the server can send is in its OpenAPI schema with its body: 413
for an oversized upload, 415 for a file that is not an image, 400 for a decompression bomb
or any other request it cannot take (a bad request never gets a 500 or stops the server),
422 for a request that does not match the schema, 401 without the token (when one is
set), 503 when more than --max-queue images wait. SIGTERM lets the requests in flight
finish, then exits 0.

On a network (TorchServe's and Triton's answers to the same problems): a request meets
its token, its size limit and the bounded queue before any image is decoded; one that does
not arrive whole within --request-timeout is closed (uvicorn has no such timeout: see
`deadline_protocol`); every answer is counted in /metrics and may be logged as a JSON line.
"""


import asyncio
import gc
import hmac
import io
import ipaddress
import json
import logging
import logging.handlers
import os
import queue
import random
import signal
import ssl
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Callable

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, ProcessCollector, generate_latest)
from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .checkpoint import LoadedModel, load
from .data import read_image
from .device import select_runtime
from .errors import SettingsError, first_line
from .predict import label_sets, predict_tensor, top_classes

PAGE = Path(__file__).with_name("page.html")

# Routes by name in the metrics and the access log; any other path counts as "other", so
# that nobody can grow the metrics by asking for new paths.
ROUTES = frozenset({"/", "/predict", "/model", "/healthz", "/metrics", "/openapi.json",
                    "/docs", "/docs/oauth2-redirect", "/redoc"})
PROTECTED = frozenset({"/predict", "/model", "/metrics"})  # behind the token, when one is set
QUEUE_WAIT_S = 0.010  # the default --max-queue: images that forward passes answer in this


class Batcher:
    """Runs the model on the images of concurrent requests together.

    One inference thread takes whatever is queued (up to `max_batch` images) and, while
    other requests are still being decoded, waits up to `max_wait_ms` for them to join.
    With nothing else in flight it runs at once: batching adds no latency without load.
    `observe(images, seconds)` hears of every forward pass (the metrics).
    """

    def __init__(self, infer: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 2.0, observe: Callable[[int, float], None] | None = None):
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000
        self.observe = observe
        self.queue: queue.Queue = queue.Queue()
        self.decoding = 0  # requests being read or decoded: worth waiting for
        self.batches = self.images = 0  # forward passes and the images they took
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    async def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Probabilities (N, K) for uint8 images (N, C, H, W), and the size of the batch
        they were answered in."""
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, daemon=True,
                                               name="cnnkit-inference")
                self.thread.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.put((images, future, loop))
        return await future

    def close(self) -> None:
        with self.lock:
            if self.thread is not None:
                self.queue.put(None)
                self.thread.join()
                self.thread = None

    def _take(self) -> list | None:
        first = self.queue.get()
        if first is None:
            return None
        jobs, n = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if self.decoding == 0 or wait <= 0:
                    break
                try:
                    job = self.queue.get(timeout=wait)
                except queue.Empty:
                    break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            jobs.append(job)
            n += len(job[0])
        return jobs

    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            n = sum(len(images) for images, _, _ in jobs)
            self.batches += 1
            self.images += n
            start = time.perf_counter()
            try:
                probs = self.infer(torch.cat([images for images, _, _ in jobs]))
                answers = [(p, n) for p in probs.split([len(images) for images, _, _ in jobs])]
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                answers = [e] * len(jobs)
            if self.observe:
                self.observe(n, time.perf_counter() - start)
            for (_, future, loop), answer in zip(jobs, answers):
                loop.call_soon_threadsafe(_settle, future, answer)


def _settle(future: asyncio.Future, answer) -> None:
    if future.done():  # the client went away
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own: two apps in one process
    (the tests) never share a counter."""

    def __init__(self, queued: Callable[[], int], max_queue: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cnnkit_requests", "HTTP requests answered, by route and "
                                "status", ["route", "status"], registry=r)
        self.seconds = Histogram("cnnkit_request_duration_seconds", "from a request's "
                                 "headers to its answer", ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10, 30))
        self.batch = Histogram("cnnkit_batch_images", "images in one forward pass",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.forward = Histogram("cnnkit_forward_seconds", "one forward pass", registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5))
        self.images = Counter("cnnkit_images", "images answered", registry=r)
        self.timeouts = Counter("cnnkit_request_timeouts", "connections closed because a "
                                "request did not arrive whole within --request-timeout",
                                registry=r)
        Gauge("cnnkit_queue_images", "images admitted and not yet answered",
              registry=r).set_function(queued)
        Gauge("cnnkit_queue_limit_images", "the most images admitted at once (--max-queue)",
              registry=r).set(max_queue)
        ProcessCollector(registry=r)  # resident memory, CPU seconds, open files

    def forward_pass(self, images: int, seconds: float) -> None:
        self.batch.observe(images)
        self.forward.observe(seconds)
        self.images.inc(images)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.seconds.labels(route).observe(seconds)


def access_logger(path: str | Path) -> logging.Logger:
    """One JSON line per request in `path`, reopened when logrotate moves it."""
    logger = logging.getLogger(f"cnnkit.access.{Path(path).resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        try:
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        except OSError as e:
            raise SettingsError(f"--access-log {path}: cannot be written ({first_line(e)})")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def log_line(log: logging.Logger, client, method: str | None, route: str | None,
             status: int, seconds: float, images=None, batch=None) -> None:
    """Time, client, route, status, images, milliseconds, batch: never an image's bytes."""
    log.info(json.dumps({
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "client": client[0] if client else None, "method": method, "route": route,
        "status": status, "images": images, "ms": round(seconds * 1000, 2), "batch": batch}))


async def _answer(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Admission:
    """At most `limit` images admitted and not yet answered (decoding, waiting or in the
    forward pass), as Triton's queue policy and TorchServe's job queue bound theirs. One
    request of more images than that is let in alone. Used from the event loop only.

    A request turned away is answered after about `delay` seconds (drawn from half to one
    and a half times it, so that clients turned away together are not answered, and do
    not retry, together). A client that retries at once (as wrk does) then asks about once
    a `delay`; answered at once, a thousand such clients kept the one event loop answering
    12,000 503s a second, and every admitted request waited behind them
    (benchmarks/RESULTS.md section 22). The wait costs a timer, not a place in the queue."""

    def __init__(self, limit: int, delay: float = 1.0):
        self.limit, self.delay, self.queued = limit, delay, 0

    @property
    def full(self) -> bool:
        return self.queued >= self.limit

    def enter(self, images: int) -> bool:
        if self.queued and self.queued + images > self.limit:
            return False
        self.queued += images
        return True

    def leave(self, images: int) -> None:
        self.queued -= images

    async def turn_away(self) -> tuple[str, str]:
        """503's detail and Retry-After, after the delay. Retry-After is 1 to 3 seconds,
        drawn, for the clients that honour it."""
        detail = (f"busy: {self.queued} images are waiting, the most this server queues "
                  f"is {self.limit}")
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.5))
        wait = random.randint(1, 3)
        return f"{detail}; retry in {wait} s", str(wait)


class Gate:
    """What every request meets before the app: its token and its size and, when the queue
    is full, a 503 before its body is read; then its answer is counted and logged. Plain
    ASGI: Starlette's BaseHTTPMiddleware costs more per request than the rest of the
    routing."""

    def __init__(self, app, *, token: str | None, body_limit: int, body_message: str,
                 admission: "Admission", metrics: Metrics,
                 access_log: logging.Logger | None):
        self.app, self.token = app, token.encode() if token else None
        self.body_limit, self.body_message = body_limit, body_message
        self.admission, self.metrics, self.access_log = admission, metrics, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in ROUTES else "other"
        state = scope.setdefault("state", {})  # the endpoint's images and batch size
        status = None

        async def answering(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self._admit(scope, receive, answering, route)
        finally:
            if status is not None:  # None: the client went away, or its time ran out
                seconds = time.perf_counter() - start
                self.metrics.answered(route, status, seconds)
                if self.access_log:
                    log_line(self.access_log, scope.get("client"), scope["method"], route,
                             status, seconds, state.get("images"), state.get("batch"))

    async def _admit(self, scope, receive, send, route: str) -> None:
        if self.token and route in PROTECTED and not self._authorized(scope["headers"]):
            return await _answer(send, 401, "this server needs its token: send the header "
                                 "'Authorization: Bearer TOKEN'",
                                 [(b"www-authenticate", b"Bearer")])
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.body_limit:
            return await _answer(send, 413, self.body_message)
        if route == "/predict" and scope["method"] == "POST" and self.admission.full:
            # turned away before its body is read, at the least cost
            detail, retry_after = await self.admission.turn_away()
            return await _answer(send, 503, detail, [(b"retry-after", retry_after.encode())])
        await self.app(scope, receive, send)

    def _authorized(self, headers) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                # constant time: how much of a guess is right must not show in the timing
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(),
                                                                           self.token)
        return False


def deadline_protocol(timeout: float, on_timeout: Callable[[tuple | None], None]) -> type:
    """uvicorn's HTTP protocol with a deadline for each request to arrive whole.

    uvicorn has no such timeout (its issue #157): its keep-alive timer is stopped by every
    byte received, so a client that sends its headers or its body a byte a second holds a
    connection as long as it likes. Here a connection's first request, and every later
    request from its first byte, has `timeout` seconds to arrive whole; then the client
    gets 408 (unless an answer has already gone out) and the connection is closed. A
    request that has arrived is never timed: its answer can take what it takes.
    """
    class RequestDeadline(HttpToolsProtocol):
        deadline: asyncio.TimerHandle | None = None
        headers_done = False

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self):
            super().on_message_begin()
            self.headers_done = False
            self._arm()

        def on_headers_complete(self):
            super().on_headers_complete()
            self.headers_done = True

        def on_message_complete(self):
            super().on_message_complete()
            self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self.deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self):
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self):
            self.deadline = None
            if self.transport.is_closing():
                return
            if not (self.headers_done and self.cycle.response_started):
                detail = (f'{{"detail": "the request did not arrive within {timeout:g} s '
                          f'(--request-timeout)"}}').encode()
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: "
                                     b"application/json\r\nconnection: close\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(detail), detail))
            on_timeout(self.client)
            self.transport.close()
    return RequestDeadline


# The schema's bodies: what the answers look like, so a client can be generated from it.
class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class")
    probability: float


class Prediction(BaseModel):
    file: str
    predictions: list[ClassProbability]
    labels: list[str] | None = Field(None, description="a multi-label model's answer: every "
                                     "label whose probability reaches its threshold, most "
                                     "probable first (possibly none); absent otherwise")


class ModelInfo(BaseModel):
    model: str
    classes: list[str]
    input_size: list[int]
    val_accuracy: float | None
    multi_label: bool = False
    thresholds: list[float] | None = None


class Error(BaseModel):
    detail: str


ERRORS = {
    400: {"model": Error, "description": "a decompression bomb, or a request that cannot "
          "be taken"},
    413: {"model": Error, "description": "an upload larger than --max-upload-mb"},
    415: {"model": Error, "description": "a file that is not a readable image"},
    503: {"model": Error, "description": "busy: more than --max-queue images would be "
          "waiting; retry after Retry-After's seconds",
          "headers": {"Retry-After": {"description": "seconds to wait before retrying",
                                      "schema": {"type": "integer"}}}},
}
UNAUTHORIZED = {401: {"model": Error, "description": "no token, or a wrong one: send "
                      "'Authorization: Bearer TOKEN'"}}


def default_max_queue(max_batch: int, forward_s: float) -> int:
    """The images that forward passes of `max_batch` answer in QUEUE_WAIT_S, and at least
    a quarter of `max_batch`, so that batches still have images to gather. Short, because
    on a CPU decoding and HTTP cost more per image than the forward pass: on this project's
    2-core machine a queue of 16-21 images kept the admitted p99 within 2x of the unloaded
    one, 52 did not (benchmarks/RESULTS.md section 22)."""
    return max(max_batch // 4, round(max_batch * QUEUE_WAIT_S / max(forward_s, 1e-6)))


def time_forward(infer: Callable[[torch.Tensor], torch.Tensor], lm: LoadedModel,
                 max_batch: int) -> float:
    """Seconds of one forward pass of `max_batch` images, the second of two (the first
    sets up kernels); it also means the first request does not pay for that set-up."""
    images = torch.zeros(max_batch, lm.in_channels, *lm.image_size, dtype=torch.uint8)
    infer(images)
    start = time.perf_counter()
    infer(images)
    return time.perf_counter() - start


def create_app(model: "str | Path | LoadedModel", max_upload_mb: float = 10.0,
               device: str = "auto", max_files: int = 64, max_batch: int = 64,
               max_wait_ms: float = 2.0, max_queue: int | None = None,
               token: str | None = None, access_log: "str | Path | None" = None,
               reject_delay: float = 1.0) -> FastAPI:
    """The app that `serve` runs. `max_queue` None: from a timed forward pass (see
    `default_max_queue`). `token`: required on /predict, /model and /metrics.
    `reject_delay`: the seconds before a 503 is answered (see `Admission`)."""
    runtime = select_runtime(device)
    lm = model if isinstance(model, LoadedModel) else load(model, runtime.device)
    lm.model.to(runtime.device, memory_format=runtime.memory_format)
    limit = int(max_upload_mb * 1024 * 1024)

    def infer(x: torch.Tensor) -> torch.Tensor:
        return predict_tensor(lm, x, runtime)
    forward_s = time_forward(infer, lm, max_batch)
    if max_queue is None:
        max_queue = default_max_queue(max_batch, forward_s)
    admission = Admission(max_queue, reject_delay)
    metrics = Metrics(lambda: admission.queued, max_queue)
    batcher = Batcher(infer, max_batch, max_wait_ms, observe=metrics.forward_pass)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # started again by the next request, if the app is started again

    app = FastAPI(title="cnnkit", lifespan=lifespan,
                  description=f"{lm.name}: {len(lm.classes)} classes. Uploads up to "
                  f"{max_upload_mb:g} MB each, at most {max_files} files per request; at "
                  f"most {max_queue} images waiting (503 past that, answered after about "
                  f"{reject_delay:g} s). A request that does "
                  "not arrive whole within the server's --request-timeout gets 408 and its "
                  "connection is closed.")
    app.state.batcher, app.state.metrics, app.state.max_queue = batcher, metrics, max_queue
    app.state.forward_s = forward_s
    app.state.access_log = access_logger(access_log) if access_log else None
    app.add_middleware(Gate, token=token, body_limit=max_files * (limit + 64 * 1024),
                       body_message=f"upload larger than {max_upload_mb:g} MB per file, "
                       f"{max_files} files", admission=admission, metrics=metrics,
                       access_log=app.state.access_log)
    # behind the token: 401 in the schema, and the scheme it asks for
    auth = UNAUTHORIZED if token else {}
    bearer = {"security": [{"bearer": []}]} if token else None

    @app.exception_handler(Exception)
    async def never_500(request: Request, exc: Exception):
        # whatever a request does, it gets an answer, and the server keeps serving
        return JSONResponse({"detail": f"bad request: {type(exc).__name__}"}, 400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo, responses=auth, openapi_extra=bearer)
    def model_info():
        return {"model": lm.name, "classes": lm.classes,
                "input_size": [lm.in_channels, *lm.image_size],
                "val_accuracy": lm.metrics.get("val_acc"), "multi_label": lm.multi_label,
                "thresholds": lm.thresholds}

    @app.get("/metrics", response_class=Response, openapi_extra=bearer, responses={
        **auth, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                      "description": "Prometheus' text format"}})
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # a single-label model's answers stay as they were: no "labels": null
    @app.post("/predict", response_model=list[Prediction], response_model_exclude_none=True,
              responses={**ERRORS, **auth}, openapi_extra=bearer)
    async def predict_files(
            request: Request,
            files: Annotated[list[UploadFile], File(min_length=1, max_length=max_files,
                                                    description="image files")],
            top_k: int = Query(3, ge=1, le=1000)):
        # let in once its body has arrived (a slow client never holds a place in the queue)
        # and been parsed, before any image is decoded
        request.state.images = len(files)
        if not admission.enter(len(files)):
            detail, retry_after = await admission.turn_away()
            raise HTTPException(503, detail, headers={"Retry-After": retry_after})
        try:
            return await answer(files, top_k, request)
        finally:
            admission.leave(len(files))

    async def answer(files: list[UploadFile], top_k: int, request: Request) -> list[dict]:
        batcher.decoding += 1
        try:
            data = [await f.read(limit + 1) for f in files]
            names = [f.filename or "upload" for f in files]
            # the event loop's thread pool: decoding (PIL releases the GIL) never stalls
            # the loop, and requests decode side by side
            images = await asyncio.get_running_loop().run_in_executor(
                None, decode_all, data, names)
        finally:
            batcher.decoding -= 1
        probs, request.state.batch = await batcher(images)
        ranked = top_classes(lm, probs, top_k)
        called = [{"labels": s["labels"]} if s else {} for s in label_sets(lm, probs)]
        return [{"file": name, "predictions": p, **c}
                for name, p, c in zip(names, ranked, called)]

    def decode_all(data: list[bytes], names: list[str]) -> torch.Tensor:
        for blob, name in zip(data, names):
            if len(blob) > limit:
                raise HTTPException(413, f"{name}: larger than {max_upload_mb:g} MB")
        return torch.stack([decode(blob, name) for blob, name in zip(data, names)])

    def decode(blob: bytes, name: str) -> torch.Tensor:
        try:
            return read_image(io.BytesIO(blob), lm.image_size, lm.in_channels)
        except Image.DecompressionBombError as e:
            raise HTTPException(400, f"{name}: refused, {e}") from None
        except UnidentifiedImageError:
            raise HTTPException(415, f"{name}: not an image (no image format recognised); "
                                "send png, jpeg, gif, bmp, webp or tiff") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise HTTPException(415, f"{name}: not a readable image ({first_line(e, 120)})"
                                ) from None

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    if token:  # the schema names the scheme that its operations' "security" points to
        openapi = app.openapi

        def openapi_with_bearer():
            if app.openapi_schema is None:
                openapi().setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}}
            return app.openapi_schema
        app.openapi = openapi_with_bearer
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: other machines may reach it


def read_token(token_file: "str | Path | None") -> str | None:
    """The token from `token_file`, else from $CNNKIT_TOKEN; None when neither is set."""
    if token_file is None:
        return os.environ.get("CNNKIT_TOKEN") or None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"--token-file {token_file}: cannot be read ({first_line(e)})")
    if not token or any(c.isspace() for c in token):
        raise SettingsError(f"--token-file {token_file}: holds no token (one line, no spaces;"
                            " make one with: python -c 'import secrets; "
                            "print(secrets.token_urlsafe(32))' > FILE)")
    return token


def check_network(host: str, token: str | None, no_token: bool, tls_cert, tls_key) -> None:
    """Refused in one line: other machines let in without a token (unless --no-token says
    it is meant), and half of a TLS pair or one that does not load."""
    if not is_loopback(host) and not token and not no_token:
        raise SettingsError(f"--host {host} lets other machines use the model: give a token "
                            "(--token-file FILE or $CNNKIT_TOKEN), or say --no-token if "
                            "anyone who can reach the port may")
    if (tls_cert is None) != (tls_key is None):
        raise SettingsError("TLS needs both --tls-cert and --tls-key")
    if tls_cert is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert,
                                                                                tls_key)
        except (OSError, ssl.SSLError) as e:
            raise SettingsError(f"--tls-cert {tls_cert} / --tls-key {tls_key}: not a "
                                f"certificate and its key ({first_line(e)})")


def raise_open_files_limit() -> None:
    """Each connection is a file: the soft limit (often 1,024) up to the hard one."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass  # not on this system, or not allowed: the soft limit stays


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10.0,
          device: str = "auto", max_files: int = 64, max_batch: int = 64,
          max_wait_ms: float = 2.0, max_queue: int | None = None,
          request_timeout: float = 30.0, keep_alive_timeout: float = 5.0,
          token: str | None = None, no_token: bool = False, tls_cert=None, tls_key=None,
          access_log=None, reject_delay: float = 1.0, log=print) -> None:
    import uvicorn
    check_network(host, token, no_token, tls_cert, tls_key)
    app = create_app(model, max_upload_mb, device, max_files, max_batch, max_wait_ms,
                     max_queue, token, access_log, reject_delay)
    metrics, logger = app.state.metrics, app.state.access_log

    def timed_out(client) -> None:
        metrics.timeouts.inc()
        if logger:
            log_line(logger, client, None, None, 408, request_timeout)
    raise_open_files_limit()
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
        http=deadline_protocol(request_timeout, timed_out),
        timeout_keep_alive=keep_alive_timeout, ssl_certfile=tls_cert, ssl_keyfile=tls_key))
    scheme = "https" if tls_cert else "http"
    log(f"serving {model} on {scheme}://{host}:{port}/ ({select_runtime(device).device}; "
        f"{'token required' if token else 'no token'}; at most {app.state.max_queue} images "
        "waiting; Ctrl-C stops)")
    # uvicorn finishes the requests in flight, then raises the signal again for the
    # handler that was there before it: a SIGTERM (a container stopping) then ends here, 0.
    stopped = []
    # Everything loaded so far lives as long as the server: out of the collector's sight,
    # a full collection no longer walks torch's objects (100-ms pauses under load).
    gc.collect()
    gc.freeze()
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    b = app.state.batcher
    log(f"{'stopped (SIGTERM)' if stopped else 'stopped'}: {b.images} images answered in "
        f"{b.batches} forward passes (mean batch {b.images / max(b.batches, 1):.1f})")
