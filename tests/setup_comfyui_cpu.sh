#!/usr/bin/env bash
# Prepare a Python environment for the real-ComfyUI tests on a CPU-only machine.
#
#   tests/setup_comfyui_cpu.sh /path/to/ComfyUI /path/to/comfy-venv
#
# ComfyUI v0.3.x imports torchvision at start-up. PyPI has no CPU build of torchvision, and its CUDA build cannot
# load next to a CPU torch because its _C.so links libc10_cuda.so and libtorch_cuda.so. This script installs
# ComfyUI's requirements (without touching torch, torchvision, torchaudio, kornia or spandrel), the torchvision
# wheel matching torch 2.13 without dependencies, and builds two tiny stand-in libraries that define the 16 CUDA
# entry points _C.so references (each aborts if ever called; on CPU they never are). Run the tests with
#
#   LD_LIBRARY_PATH=<venv>/cuda-stubs COMFYUI_PATH=<ComfyUI> <venv>/bin/python -m pytest tests
set -euo pipefail
COMFY="${1:?usage: $0 COMFYUI_PATH VENV}"
VENV="${2:?usage: $0 COMFYUI_PATH VENV}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
grep -v -E '^(torch|torchvision|torchaudio|kornia|spandrel)([^a-z_-]|$)|^#|^$' "$COMFY/requirements.txt" > "$VENV/comfy-reqs.txt"
"$PY" -m pip install -q torch==2.13.0 -r "$VENV/comfy-reqs.txt"
"$PY" -m pip install -q torch==2.13.0 -e "$(cd "$(dirname "$0")/.." && pwd)[test]"
TMP="$(mktemp -d)"
"$PY" -m pip download -q --no-deps torchvision==0.28.0 -d "$TMP"
"$PY" -m pip install -q --no-deps "$TMP"/torchvision-*.whl
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TL="$SITE/torch/lib"
nm -D --undefined-only "$SITE/torchvision/_C.so" | awk '{print $2}' | sort -u > "$TMP/undef"
for f in "$TL"/*.so*; do nm -D --defined-only "$f" 2>/dev/null | awk '{print $3}'; done | sort -u > "$TMP/def"
comm -23 "$TMP/undef" "$TMP/def" | grep -v -E '@|^_ITM|^__gmon|^_ZTH' > "$TMP/missing"
{
  echo '#include <stdio.h>'; echo '#include <stdlib.h>'
  while read -r s; do
    case "$s" in
      *CUDACachingAllocator9allocatorE) echo "void* $s = 0;" ;;
      *) echo "void $s(void) { fprintf(stderr, \"CUDA is not available: $s\\n\"); abort(); }" ;;
    esac
  done < "$TMP/missing"
} > "$TMP/stub.c"
mkdir -p "$VENV/cuda-stubs"
for lib in libc10_cuda.so libtorch_cuda.so; do
  gcc -shared -fPIC -Wl,-soname,$lib -o "$VENV/cuda-stubs/$lib" "$TMP/stub.c"
done
LD_LIBRARY_PATH="$VENV/cuda-stubs" "$PY" -c "import torchvision, comfy" 2>/dev/null || true
LD_LIBRARY_PATH="$VENV/cuda-stubs" "$PY" -c "import torchvision; print('torchvision', torchvision.__version__, 'loads')"
echo "run: LD_LIBRARY_PATH=$VENV/cuda-stubs COMFYUI_PATH=$COMFY $PY -m pytest tests"
