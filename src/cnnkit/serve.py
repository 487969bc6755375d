"""`serve`: a trained model over HTTP (FastAPI + uvicorn), with a web page to try it.

POST /predict (multipart images) answers in `cnnkit predict --json` format; GET /model,
GET /healthz, GET /openapi.json; GET / is a page that needs nothing from the internet.
Oversized uploads get 413, non-images 415, decompression bombs 400; a bad request never
gets a 500 and never stops the server.
"""
import io
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError

from .checkpoint import LoadedModel, load
from .device import select_runtime
from .predict import predict

PAGE = Path(__file__).with_name("page.html")


def create_app(model: "str | Path | LoadedModel", max_upload_mb: float = 10.0,
               device: str = "auto") -> FastAPI:
    runtime = select_runtime(device)
    lm = model if isinstance(model, LoadedModel) else load(model, runtime.device)
    limit = int(max_upload_mb * 1024 * 1024)
    app = FastAPI(title="cnnkit", description=f"{lm.name}: {len(lm.classes)} classes")

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + 64 * 1024:
            return JSONResponse({"detail": f"upload larger than {max_upload_mb:g} MB"}, 413)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def never_500(request: Request, exc: Exception):
        # whatever a request does, it gets an answer, and the server keeps serving
        return JSONResponse({"detail": f"bad request: {type(exc).__name__}"}, 400)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/model")
    def model_info():
        return {"model": lm.name, "classes": lm.classes,
                "input_size": [lm.in_channels, *lm.image_size],
                "val_accuracy": lm.metrics.get("val_acc")}

    @app.post("/predict")
    def predict_files(files: list[UploadFile] = File(...),
                      top_k: int = Query(3, ge=1, le=1000)):
        images = []
        for f in files:
            data = f.file.read(limit + 1)
            if len(data) > limit:
                raise HTTPException(413, f"{f.filename}: larger than {max_upload_mb:g} MB")
            images.append((f.filename or "upload", _decode(data, f.filename)))
        results = predict(lm, [im for _, im in images], top_k=top_k, device=device)
        for (name, _), r in zip(images, results):
            r["file"] = name
        return results

    def _decode(data: bytes, name: str | None) -> Image.Image:
        try:
            im = Image.open(io.BytesIO(data))
            im.load()
            return ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise HTTPException(400, f"{name}: refused, {e}") from None
        except UnidentifiedImageError:
            raise HTTPException(415, f"{name}: not an image (no image format recognised); "
                                "send png, jpeg, gif, bmp, webp or tiff") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise HTTPException(415, f"{name}: not a readable image "
                                f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                                ) from None

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text(encoding="utf-8")

    return app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10.0,
          device: str = "auto", log=print) -> None:
    import uvicorn
    app = create_app(model, max_upload_mb, device)
    log(f"serving {model} on http://{host}:{port}/ ({select_runtime(device).device}; "
        "Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
