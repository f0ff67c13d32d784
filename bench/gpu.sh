#!/usr/bin/env bash
# The suite on a GPU machine, in parts that each fit one 10-minute command (bench/README.md):
#
#   bash bench/gpu.sh PART [BASELINE]
#
#   7b          rank, rank-full, extract, merge on the 7B pair (DK_TARGETS=... for fewer) (~4 min; ~6 with BASELINE)
#   7b-more     compare, intruders on the 7B pair                         (~4 min; ~6 with BASELINE)
#   aware       extract and extract --calibration --activation-aware (64 × 512 tokens) on the 7B pair
#   tall        rank on the tall-thin pair: peak RSS against one tensor's fp32 size (~1 min)
#   peer-rank   rank and the plain svdvals loop (7B)                      (~6 min)
#   peer-extract extract and mergekit-extract-lora (7B; mergekit from .whl/) (~7 min)
#   peer-merge  merge and PEFT's merge_and_unload (7B)                    (~4 min)
#   x2          rank, extract, merge under torchrun on 2 GPUs (7B)        (~4 min)
#   sdxl        rank, extract --format kohya on the SDXL-UNet pair (2.6B)  (~4 min)
#   peer-sdxl   extract --format kohya and LyCORIS's extract_linear (SDXL UNet; lycoris from .whl/) (~6 min)
#   tiny        every target on the tiny pair: a check of the machine    (~1 min)
#   cuda-tests  the test files that run on every GPU
#
# BASELINE (a revision when git is there, else a folder with another tree, e.g. .baseline made by
# `git archive REV | tar -x -C .baseline` and carried along): every target also runs on it, interleaved
# with this tree: before and after in the same run. Results: $OUT/PART/results.{md,json} and log.txt.
set -uo pipefail
PART=${1:?usage: bash bench/gpu.sh PART [BASELINE]}
BASELINE=${2:-}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}/$PART
WORK=${DK_BENCH_WORK:-/tmp/dk-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# This tree into the image's Python (its dependencies are there already); the runner puts the measured
# tree first on PYTHONPATH anyway, so a failed install costs only the console script.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
if ls .whl/*.whl >/dev/null 2>&1; then  # mergekit, lycoris-lora and what they need beyond the image, as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dk-site .whl/*.whl &&
        export PYTHONPATH=/tmp/dk-site${PYTHONPATH:+:$PYTHONPATH}
fi
# The device image sets PYTHONDONTWRITEBYTECODE and ships torch without .pyc: every process would compile
# torch (3.5-4.9 s of each start). A user's pip install compiles once; cache the bytecode as it would.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/dk-pyc
python3 -c "import torch, deltakit, deltakit_cli.main" 2>/dev/null
nvidia-smi -L 2>/dev/null
bench() {  # bench PRESET ARGS...: one run of the suite, the table printed at the end
    python3 -m bench run --preset "$1" --workdir "$WORK/$1" --out "$OUT" "${@:2}" 2>"$OUT/log.txt" >/dev/null
    echo "exit $?"; grep -E "^\[.*(ok|failed|skipped|timeout)" "$OUT/log.txt" | cut -c1-200; cat "$OUT/results.md"
}
B=()
[ -n "$BASELINE" ] && B=(--baseline "$BASELINE")
case "$PART" in
7b) bench 7b --target "${DK_TARGETS:-rank,rank-full,extract,merge}" --timeout 240 ${B[@]+"${B[@]}"} ;;
7b-more) bench 7b --target compare,intruders --timeout 240 ${B[@]+"${B[@]}"} ;;
tall) bench tall --target rank --timeout 240 ${B[@]+"${B[@]}"} ;;
aware) bench 7b --target extract,extract-aware --timeout 420 ;;
peer-rank) bench 7b --target rank --peers --timeout 420 ;;
peer-extract) bench 7b --target extract --peers --timeout 420 ;;
peer-merge) bench 7b --target merge --peers --timeout 300 ;;
x2) bench 7b --target rank,extract,merge --processes 2 --timeout 240 ;;
tiny) bench tiny --peers --timeout 120 ${B[@]+"${B[@]}"} ;;
sdxl) bench sdxl-unet --target rank,extract-kohya --timeout 240 ${B[@]+"${B[@]}"} ;;
peer-sdxl) bench sdxl-unet --target extract-kohya --peers --timeout 420 ;;
cuda-tests)
    python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_adaptive.py tests/test_workers.py \
        tests/test_noise.py tests/test_memory.py tests/test_quantized_noise.py tests/test_distributed.py \
        tests/test_calibration.py tests/test_numerical_rank.py tests/test_adapters.py 2>&1 |
        tee "$OUT/pytest.txt" | tail -15 ;;
*) echo "unknown part $PART (see the top of bench/gpu.sh)"; exit 2 ;;
esac
