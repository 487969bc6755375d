"""`serve`: a trained model over HTTP (FastAPI + uvicorn), with a web page to try it.

POST /predict (multipart images) answers in `cnnkit predict --json` format; GET /model,
GET /healthz, GET /openapi.json; GET / is a page that needs nothing from the internet.

Concurrent requests are batched dynamically, as TorchServe and Triton do: uploads are
decoded in a thread pool, and one inference thread runs whatever images are waiting as one
batch. Every status code the server can send is in its OpenAPI schema with its body: 413
for an oversized upload, 415 for a file that is not an image, 400 for a decompression bomb
or any other request it cannot take (a bad request never gets a 500 or stops the server),
422 for a request that does not match the schema. SIGTERM lets the requests in flight
finish, then exits 0.
"""

import asyncio
import gc
import io
import queue
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Callable

import torch
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import LoadedModel, load
from .data import read_image
from .device import select_runtime
from .errors import first_line
from .predict import label_sets, predict_tensor, top_classes

PAGE = Path(__file__).with_name("page.html")


class Batcher:
    """Runs the model on the images of concurrent requests together.

    One inference thread takes whatever is queued (up to `max_batch` images) and, while
    other requests are still being decoded, waits up to `max_wait_ms` for them to join.
    With nothing else in flight it runs at once: batching adds no latency without load.
    """

    def __init__(self, infer: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 2.0):
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait_ms / 1000
        self.queue: queue.Queue = queue.Queue()
        self.decoding = 0  # requests being read or decoded: worth waiting for
        self.batches = self.images = 0  # forward passes and the images they took
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    async def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, K) for uint8 images (N, C, H, W)."""
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
            self.batches += 1
            self.images += sum(len(images) for images, _, _ in jobs)
            try:
                probs = self.infer(torch.cat([images for images, _, _ in jobs]))
                answers = probs.split([len(images) for images, _, _ in jobs])
            except Exception as e:  # noqa: BLE001 - each waiting request gets the error
                answers = [e] * len(jobs)
            for (_, future, loop), answer in zip(jobs, answers):
                loop.call_soon_threadsafe(_settle, future, answer)


def _settle(future: asyncio.Future, answer) -> None:
    if future.done():  # the client went away
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class BodyLimit:
    """413 before reading a body whose declared length is past the limit. Plain ASGI:
    Starlette's BaseHTTPMiddleware costs more per request than the rest of the routing."""

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                response = JSONResponse({"detail": self.message}, 413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


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
}


def create_app(model: "str | Path | LoadedModel", max_upload_mb: float = 10.0,
               device: str = "auto", max_files: int = 64, max_batch: int = 64,
               max_wait_ms: float = 2.0) -> FastAPI:
    runtime = select_runtime(device)
    lm = model if isinstance(model, LoadedModel) else load(model, runtime.device)
    lm.model.to(runtime.device, memory_format=runtime.memory_format)
    limit = int(max_upload_mb * 1024 * 1024)
    batcher = Batcher(lambda x: predict_tensor(lm, x, runtime), max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()  # started again by the next request, if the app is started again

    app = FastAPI(title="cnnkit", lifespan=lifespan,
                  description=f"{lm.name}: {len(lm.classes)} classes. Uploads up to "
                  f"{max_upload_mb:g} MB each, at most {max_files} files per request.")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=max_files * (limit + 64 * 1024),
                       message=f"upload larger than {max_upload_mb:g} MB per file, "
                       f"{max_files} files")

    @app.exception_handler(Exception)
    async def never_500(request: Request, exc: Exception):
        # whatever a request does, it gets an answer, and the server keeps serving
        return JSONResponse({"detail": f"bad request: {type(exc).__name__}"}, 400)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo)
    def model_info():
        return {"model": lm.name, "classes": lm.classes,
                "input_size": [lm.in_channels, *lm.image_size],
                "val_accuracy": lm.metrics.get("val_acc"), "multi_label": lm.multi_label,
                "thresholds": lm.thresholds}

    # a single-label model's answers stay as they were: no "labels": null
    @app.post("/predict", response_model=list[Prediction], responses=ERRORS,
              response_model_exclude_none=True)
    async def predict_files(
            files: Annotated[list[UploadFile], File(min_length=1, max_length=max_files,
                                                    description="image files")],
            top_k: int = Query(3, ge=1, le=1000)):
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
        probs = await batcher(images)
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

    return app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10.0,
          device: str = "auto", max_files: int = 64, max_batch: int = 64,
          max_wait_ms: float = 2.0, log=print) -> None:
    import uvicorn
    app = create_app(model, max_upload_mb, device, max_files, max_batch, max_wait_ms)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    log(f"serving {model} on http://{host}:{port}/ ({select_runtime(device).device}; "
        "Ctrl-C stops)")
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
