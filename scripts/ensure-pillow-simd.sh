#!/usr/bin/env bash
# pillow-simd and Pillow install into the same `PIL` package; any dependency that asks for
# "pillow" silently overwrites the SIMD build. Put pillow-simd back if that happened.
# Usage: scripts/ensure-pillow-simd.sh [PYTHON]   (default: python)
set -euo pipefail
py=${1:-python}
needs="pillow-simd builds from source: it needs a C compiler, the Python headers and the libjpeg-turbo and zlib
headers (Debian/Ubuntu: sudo apt-get install build-essential python3-dev libjpeg-dev zlib1g-dev)"
if "$py" -m pip show -q pillow >/dev/null 2>&1; then
    echo "ensure-pillow-simd: plain Pillow was pulled in by a dependency; restoring pillow-simd"
    "$py" -m pip uninstall -q -y pillow pillow-simd
    "$py" -m pip install -q --no-deps --force-reinstall pillow-simd || { echo "ensure-pillow-simd: $needs" >&2; exit 1; }
fi
"$py" -c 'import importlib.metadata as m, PIL; v = m.version("pillow-simd"); assert PIL.__version__ == v, (PIL.__version__, v); print("ensure-pillow-simd: PIL", PIL.__version__, "(pillow-simd)")'
