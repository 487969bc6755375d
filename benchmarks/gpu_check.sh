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

# Not in the GPU machine's image (its python3 has torch, torchvision, numpy, pillow,
# scikit-learn, matplotlib, onnx, onnxruntime, safetensors, tqdm, pandas, httpx, pytest).
WHEELS="fastapi starlette pydantic pydantic-core annotated-types typing-inspection
        typing-extensions opentelemetry-api annotated-doc uvicorn python-multipart captum
        torchinfo onnxscript onnx-ir ml-dtypes pyyaml uvloop httptools"

if [ "${1:-}" = "--prepare" ]; then
    shared=${CNNKIT_SHARED_DATA:-../shared/data}
    mkdir -p .gpu/data .gpu/whl
    cp -r "$shared/cifar10-subset" "$shared/cifar10-png-sample" .gpu/data/
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
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import fastapi, captum, torchinfo, onnxscript, yaml" 2>/dev/null
then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cnnkit-site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/cnnkit-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
