#!/usr/bin/env bash
# pillow-simd and Pillow install into the same `PIL` package; any dependency that asks for
# "pillow" silently overwrites the SIMD build. Put pillow-simd back if that happened.
set -euo pipefail
py=${1:-python}
if "$py" -m pip show -q pillow >/dev/null 2>&1; then
    echo "ensure-pillow-simd: plain Pillow was pulled in by a dependency; restoring pillow-simd"
    "$py" -m pip uninstall -q -y pillow pillow-simd
    "$py" -m pip install -q --no-deps --force-reinstall pillow-simd
fi
"$py" -c 'import importlib.metadata as m, PIL; v = m.version("pillow-simd"); assert PIL.__version__ == v, (PIL.__version__, v); print("ensure-pillow-simd: PIL", PIL.__version__, "(pillow-simd)")'
