#!/usr/bin/env bash
# imgprep's GPU check, in tiers that each fit a budget of device time; scripts/GPU-CHECK.md has the
# exact sequence of device calls. Every option but the first two goes to scripts/gpu_check.py:
#
#   scripts/gpu-check.sh --take-part .gpu/dali/p0     copy a carried DALI part to /tmp/parts (and stop,
#                                                     unless a tier follows: then unpack first)
#   scripts/gpu-check.sh --tier N [--budget S]        run tier N within S seconds (default: its budget)
#   scripts/gpu-check.sh --dry-run                    every step of every tier on a CPU, tiny (<= 3 min)
#
# Results go to $OUT (else build/gpu-check): summary.json, report.md, log.txt, rewritten after each step.
# Data and state stay in /tmp/imgprep-gpu between calls while the machine is up.
#
# Device time, 15 minutes in all; the plan takes about 12.8 (s = seconds, measured or set here):
#   machine start                                      120 s  (1-2 min)
#   call 1: carry DALI part p0 (56 MiB), copy it        20 s
#   call 2: carry part p1 (15 MiB), unpack (754 MiB),   15 s
#           tier 1: doctor, GPU graph per policy,      150 s  budget
#           contract + policy tests, break/restart
#   call 3: tier 2: data (10,000 JPEGs, 2 LMDBs),      215 s  budget
#           bench-loader rows, policies, feed CPU,
#           record source, resnet on 480, split
#   call 4: tier 3: ResNet-50 fed 3 ways + eval,       180 s  budget
#           the example, build-lmdb 1-16 jobs + shards
#   transfers back, and 3 gaps between calls (<30 s     65 s
#   each, or the machine goes back), give_back at once
#   ----------------------------------------------------------
#   total                                              765 s = 12.8 min (13 planned, of the 15 a device call allows)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
parts=${DALI_PARTS:-/tmp/parts}
dali=${DALI_DIR:-/tmp/dali}
take=
if [ "${1:-}" = "--take-part" ]; then
    take=${2:?--take-part needs the carried part folder, e.g. .gpu/dali/p0}
    shift 2
    mkdir -p "$parts"
    cp "$take/part" "$parts/$(basename "$take")"
    if [ -f "$(dirname "$take")/pack.json" ]; then cp "$(dirname "$take")/pack.json" "$parts/pack.json"; fi
    echo "gpu-check: $(basename "$take") in $parts ($(ls "$parts" | grep -c '^p[0-9]$') part(s) there)" >&2
    [ $# -gt 0 ] || exit 0
fi
if [ ! -d "$dali/site" ] && [ -f "$parts/pack.json" ]; then
    # every part named in pack.json must be there, whole, before the stream is unpacked
    "$py" - "$parts" <<'EOF'
import hashlib, json, pathlib, sys
parts = pathlib.Path(sys.argv[1])
for i, part in enumerate(json.loads((parts / "pack.json").read_text())["parts"]):
    have = parts / f"p{i}"
    if not have.exists() or hashlib.sha256(have.read_bytes()).hexdigest() != part["sha256"]:
        sys.exit(f"gpu-check: DALI part p{i} is {'damaged' if have.exists() else 'missing'} in {parts}: "
                 f"carry .gpu/dali/p{i} with --take-part again")
EOF
    mkdir -p "$dali"
    start=$(date +%s)
    cat "$parts"/p? | xz -d | tar x -C "$dali"
    echo "gpu-check: DALI unpacked into $dali/site in $(( $(date +%s) - start )) s" >&2
fi
site=()
if [ -d "$dali/site" ]; then site=(--site "$dali/site"); fi
exec "$py" scripts/gpu_check.py "${site[@]}" "$@"
