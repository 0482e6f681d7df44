#!/usr/bin/env bash
# One GPU session in one command, sized for a 15-minute device window (start-up included): it ends
# in under 7 minutes. Stages, most important first; each prints its part of the summary and packs
# the results as soon as it ends, so a session cut short still returns what it measured:
#   1. correctness gate: the gpu-marked tests, compiled, stop at the first failure (<= 75 s)
#   2. the dispatch table of backend="auto": fused vs composed over supervised-row densities, at 4k;
#      its rules are marked verified only when stage 1 passed, and only verified rules make `auto`
#      run the fused kernels (commit the returned dispatch_table.json as causalattn/dispatch_table.json)
#   3. kernel core: causalattn vs sdpa-flash vs sdpa-cudnn, N = 1k/4k/16k, fwd and bwd apart
#   4. all features: the harness's all-features preset (every feature, the composed path, baselines)
#   5. per-kernel GPU time of one step (torch profiler)
#   6. tile-config A/B of the backward and forward kernels (CAUSALATTN_TILES)
# Ratios are printed against sdpa-flash and against the fastest SDPA backend of each shape.
#
#   OUT=<dir> bash benchmarks/gpu_session.sh       # results land in $OUT (default benchmarks/results/gpu-session)
#   CAUSALATTN_GIT_COMMIT=<sha> ...                # stamp rows where the tree has no .git
#
# $OUT receives at most 8 files: summary.txt, session.tar.gz (every log and CSV of the work folder),
# kernel-core.csv, all-features.csv, dispatch.csv, dispatch_table.json, kernel_profile.csv, tiles.csv.
# Without CUDA every stage after the machine line says "skipped" (a dry run: `bash
# benchmarks/gpu_session.sh` on a CPU machine).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=.
# The package is not installed on the device machine: `kernels/` becomes `causalattn.kernels` only
# through an install's package-dir mapping (setup.py), so the tree gets the same mapping as a link,
# removed again at exit when this script made it.
if [ ! -e causalattn/kernels ]; then
    ln -s ../kernels causalattn/kernels
    trap 'rm -f causalattn/kernels' EXIT
fi
OUT=${OUT:-benchmarks/results/gpu-session}
WORK=$(mktemp -d)
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-75}
KERNEL_CORE_BUDGET_S=${KERNEL_CORE_BUDGET_S:-80}
ALL_FEATURES_BUDGET_S=${ALL_FEATURES_BUDGET_S:-80}
PROFILE_TIMEOUT_S=${PROFILE_TIMEOUT_S:-45}
TILES_BUDGET_S=${TILES_BUDGET_S:-60}
DISPATCH_BUDGET_S=${DISPATCH_BUDGET_S:-45}
CASE_GRACE_S=${CASE_GRACE_S:-15}  # a sweep is killed this long after its budget (a hung compile)
REP_MS=${REP_MS:-25}
# Every stage is cut to what is left of this (a sweep's budget shrinks, a stage that does not fit is
# skipped), so the script ends within about SESSION_BUDGET_S + 10 s: 6.7 minutes.
SESSION_BUDGET_S=${SESSION_BUDGET_S:-390}
mkdir -p "$OUT"
SECONDS=0
summary="$WORK/summary.txt"
: > "$summary"

stage() { printf '\n### %s (at %d s)\n' "$1" "$SECONDS" | tee -a "$summary"; }
note() { tee -a "$summary"; }
pack() {  # after every stage: the archive of the work folder, the CSVs and the summary into $OUT
    tar -czf "$OUT/session.tar.gz" -C "$WORK" . 2>/dev/null
    for file in summary.txt kernel-core.csv all-features.csv dispatch.csv dispatch_table.json kernel_profile.csv tiles.csv; do
        [ -f "$WORK/$file" ] && cp "$WORK/$file" "$OUT/"
    done
    return 0
}
left() { echo $((SESSION_BUDGET_S - SECONDS)); }
# can_run <stage budget>: CUDA is there and the stage fits what is left of the session budget
can_run() {
    if [ "$has_cuda" != 1 ]; then echo "skipped: no CUDA device" | note; return 1; fi
    if [ "$(left)" -lt "$1" ]; then echo "skipped: $(left) s left of the session budget, the stage needs $1" | note; return 1; fi
    return 0
}
sweep() {  # sweep <name> <budget> <harness args...>: one harness run into $WORK/<name>.csv
    local name=$1 budget=$2
    shift 2
    [ "$budget" -gt $(($(left) - CASE_GRACE_S)) ] && budget=$(($(left) - CASE_GRACE_S))
    if [ "$budget" -lt 10 ]; then echo "$name: skipped, the session budget is spent" | note; return 0; fi
    timeout $((budget + CASE_GRACE_S)) python3 -m benchmarks --out "$WORK/$name.d" --rep-ms "$REP_MS" \
        --time-budget-s "$budget" "$@" > "$WORK/$name.log" 2>&1
    echo "exit $?, $(grep -h -e '^done:' -e '^time budget' "$WORK/$name.log" | cut -c1-200 | tr '\n' ' ')" | note
    cat "$WORK/$name.d"/*.csv > /dev/null 2>&1 && python3 - "$WORK/$name.d" "$WORK/$name.csv" <<'PY'
import csv, pathlib, sys
rows, fields = [], None
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.csv")):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = fields or reader.fieldnames
        rows += list(reader)
if fields:
    with open(sys.argv[2], "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
PY
}

stage "machine"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import causalattn.kernels.attention_fwd as k; print('kernels from', k.__file__)"
    echo "commit ${CAUSALATTN_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} | note
has_cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
pack

stage "1. correctness gate: pytest -m gpu -x (timeout ${TESTS_TIMEOUT_S} s)"
tests_status=0
if can_run 30; then
    timeout "$TESTS_TIMEOUT_S" python3 -m pytest -m gpu -x -q -p no:cacheprovider > "$WORK/gpu_tests.log" 2>&1
    tests_status=$?
    echo "exit $tests_status: $(tail -n 1 "$WORK/gpu_tests.log")" | note
fi
pack

stage "2. dispatch table: fused vs composed over 5 densities of supervised rows (budget ${DISPATCH_BUDGET_S} s)"
if can_run 30; then
    sweep dispatch "$DISPATCH_BUDGET_S" --preset dispatch --seq-lens 4096 \
        --providers sdpa-flash causalattn+all composed+all causalattn+cat composed+cat
    cp causalattn/dispatch_table.json "$WORK/dispatch_table.json"
    # Rules become verified (used by backend="auto") only when stage 1's tests passed on this device.
    verified=()
    [ "$tests_status" = 0 ] && [ -s "$WORK/gpu_tests.log" ] && verified=(--verified)
    python3 -m benchmarks.dispatch_table "$WORK/dispatch.csv" --out "$WORK/dispatch_table.json" "${verified[@]}" 2>&1 | note
fi
pack

stage "3. kernel core: causalattn vs sdpa-flash, sdpa-cudnn; fwd, bwd (budget ${KERNEL_CORE_BUDGET_S} s)"
if can_run 40; then
    sweep kernel-core "$KERNEL_CORE_BUDGET_S" --preset kernel-core --providers sdpa-flash sdpa-cudnn causalattn \
        --seq-lens 1024 4096 16384 --heads-kv 8 --modes fwd bwd
    python3 -m benchmarks.ratios "$WORK/kernel-core.csv" 2>&1 | note
fi
pack

stage "4. all features, incl. the composed path (budget ${ALL_FEATURES_BUDGET_S} s)"
if can_run 40; then
    sweep all-features "$ALL_FEATURES_BUDGET_S" --preset all-features --modes fwd fwd+bwd
    python3 -m benchmarks.ratios "$WORK/all-features.csv" 2>&1 | note
fi
pack

stage "5. per-kernel GPU time of one step (torch profiler, timeout ${PROFILE_TIMEOUT_S} s)"
if can_run 25; then
    timeout "$PROFILE_TIMEOUT_S" python3 -m benchmarks.kernel_profile --providers causalattn causalattn+all \
        --seq-lens 4096 16384 --csv "$WORK/kernel_profile.csv" > "$WORK/kernel_profile.log" 2>&1
    echo "exit $?" | note
    note < "$WORK/kernel_profile.log"
fi
pack

stage "6. tile-config A/B, N = 4k/16k (budget ${TILES_BUDGET_S} s over all configurations)"
if can_run 30; then
    # "default" is the table in kernels/tiles.py; the others change one kernel's tiles
    # (queries x keys x warps x stages). One sweep per configuration, each its own share of the budget.
    configs=(default "dkdv=64x128x8x3" "dkdv=64x128x8x2" "dq=64x64x8x2" "fwd=128x128x8x2")
    share=$((TILES_BUDGET_S / ${#configs[@]}))  # each sweep ends early; its kernels compile inside the share
    for config in "${configs[@]}"; do
        tiles=$config
        [ "$config" = default ] && tiles=""
        CAUSALATTN_TILES="$tiles" sweep "tiles-$config" "$share" --preset kernel-core --providers causalattn \
            --seq-lens 4096 16384 --heads-kv 8 --modes fwd bwd
        python3 - "$WORK/tiles-$config.csv" "$config" "$WORK/tiles.csv" <<'PY'
import csv, os, sys
source, config, target = sys.argv[1:]
if os.path.exists(source):
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    new = not os.path.exists(target)
    with open(target, "a", newline="") as f:
        writer = csv.DictWriter(f, ["tiles", "mode", "seq_len", "median_ms", "tflops", "status"], extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows({**row, "tiles": config} for row in rows)
PY
    done
    [ -f "$WORK/tiles.csv" ] && column -s, -t < "$WORK/tiles.csv" | note
fi
pack

stage "done in ${SECONDS} s; gpu tests exit status ${tests_status}"
pack
rm -rf "$WORK"
exit "$tests_status"
