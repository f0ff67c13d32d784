#!/usr/bin/env bash
# Every GPU measurement of a session, in calls that each fit the device tool's 10 minutes:
#   bash bench/gpu_all.sh bench   # 7B rows (rank before/after the noise-aware spectra, extract, merge),
#                                 # DoRA vs LoRA merge, adapter resize in factor space
#   bash bench/gpu_all.sh more    # the CUDA test paths, MoE slice, durability (fsync on/off)
#   bash bench/gpu_all.sh compare # compare on two fine-tunes vs rank on one pair (reuses the 7B pair)
#   bash bench/gpu_all.sh rankab  # rank before (.old) and after on one machine, nothing else
#   bash bench/gpu_all.sh adaptive # adaptive vs full spectra: per-matrix probe (7B, 70B shapes), 7B rank rows
#   bash bench/gpu_all.sh quick   # adaptive pieces, the 7B rank row, its profile, the adaptive CUDA tests
#   bash bench/gpu_all.sh s4      # rank adaptive/full with both reports kept, read_paths, adaptive_parts (~5 min)
#   bash bench/gpu_all.sh s5      # rank adaptive/full/fp64 + extract, plan variants vs both references (~6 min)
#   bash bench/gpu_all.sh s6      # adaptive_parts with sliced products, a rank trace on 6 layers (~2 min)
#   bash bench/gpu_all.sh s7      # the whole test suite on the GPU machine, 8 groups of files at once
#   bash bench/gpu_all.sh s9      # s8, then rank on the 7B pair and the CUDA tests of the adaptive path and I/O
#   bash bench/gpu_all.sh s10     # rank adaptive/full on 7B, rank() by thread count, a trace on 2 threads, CUDA tests
#   bash bench/gpu_all.sh s11     # rank adaptive/full on 7B (3 threads), rank() by threads, split-bf16 Lanczos products
#   bash bench/gpu_all.sh s12     # a fresh process's start, piece by piece; rank three times; torch's import by module
#   bash bench/gpu_all.sh s13     # rank adaptive/full on 7B (agreement), twice more, a fresh process's start, CUDA tests
#   bash bench/gpu_all.sh s14     # s8, then rank adaptive/full on 7B (agreement, memory), CUDA tests of the threads
#   bash bench/gpu_all.sh s15     # the CUDA tests of the commands that stream pairs (MoE, quantized, models, hub, compare...)
#   bash bench/gpu_all.sh x2      # on 2 GPUs: the 7B rows in 1 and 2 processes, then rank/extract/merge/compare/DoRA
#                                 # merge in 1 process and under torchrun, compared byte for byte (bench/torchrun_compare.py)
#   bash bench/gpu_all.sh x2b     # on 2 GPUs: the NCCL test; extract, merge, DoRA merge, extract --budget, intruders
#                                 # --scale in 1 process vs torchrun 2
#   bash bench/gpu_all.sh x2c     # on 2 GPUs: the CUDA tests of the threads on cuda:0 and cuda:1 (rank on cuda:1 failed
#                                 # in s6-tests-4), the distributed tests, rank --device cuda:1 against cuda:0
#   bash bench/gpu_all.sh pyc     # is torch's bytecode cached on this machine, and what its import costs with and without
#   bash bench/gpu_all.sh x2cp    # pyc, then x2c
#   bash bench/gpu_all.sh g2      # library calls on cuda:1 with cuda:0 current: the probe, test_devices, a sanitizer
#   bash bench/gpu_all.sh s17     # s16's tests and rows after the ldexp fix and the frozen exit, with a sanitizer run and
#                                 # the CLI's timeline (bench/probes/cli_timeline.py) with and without bytecode
#   bash bench/gpu_all.sh s18     # the 7B rank row with bytecode cached, the CLI's timeline with its usual and a hard exit
#   bash bench/gpu_all.sh s16     # the threads' CUDA tests per file (both GPUs), 7B rank/full, rank with bytecode cached
#   bash bench/gpu_all.sh s8      # rank adaptive and --full-spectrum on a 70B-shaped slice (8 layers)
#   bash bench/gpu_all.sh final2  # rank adaptive/full (agreement), rank without CUDA graphs, the CUDA tests (~5 min)
#   bash bench/gpu_all.sh trace   # a profiler trace of rank on 6 layers of the 7B shape, and torch's import time
#   bash bench/gpu_all.sh final   # rank before (.old) / adaptive / full, the 70B-shaped memory slice, CUDA tests
# Results land in $OUT (the device tool's output folder; any folder elsewhere). "Before" is the
# tree in .old/ (git archive of the commit before, carried beside the repo; skipped if absent).
set -uo pipefail
export PYTHONUNBUFFERED=1
PART=${1:-bench}
FINAL=${OUT:-bench/results/gpu}
OUT=/tmp/dk-gpu-results/$PART  # staged, then packed into $FINAL/$PART.tgz (the device tool returns few files)
W=${DK_BENCH_WORK:-/tmp/dk-bench}
mkdir -p "$OUT" "$FINAL"
trap 'tar czf "$FINAL/$PART.tgz" -C /tmp/dk-gpu-results "$PART"' EXIT
cd "$(dirname "$0")/.."
log() { echo "== $(date +%T) $*"; }
rank_before() {  # the 7B rank row of the tree in .old/ (the commit before), when it was carried along
    if [ -d .old ]; then
        log "rank before (.old)"
        (cd .old && python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/old" --only deltakit-rank --timeout 200)
    fi
}
cli_overhead() {  # rank()'s own elapsed_s in the last rank row, and what imports and CUDA's start cost alone
    python3 -c "import json; print('rank() elapsed_s', json.load(open('$W/runs/deltakit-rank.json'))['elapsed_s'])"
    python3 -c "import time; t = time.perf_counter(); import deltakit.analysis, deltakit.report, torch; a = time.perf_counter(); torch.zeros(1, device='cuda'); print(f'imports {a - t:.2f} s, CUDA start {time.perf_counter() - a:.2f} s')"
}
rank_and_full() {  # the 7B rank rows, adaptive and --full-spectrum (their agreement), with both per-matrix reports
    log "rank (adaptive) and rank --full-spectrum on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    cli_overhead
    cp "$W"/runs/deltakit-rank*.json "$OUT/new/"
}
install_tree() {  # this tree, installed into the image's Python (else on PYTHONPATH)
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
}
run_tests() {  # pytest on the named files, full output kept, its tail shown
    python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT/pytest_gpu_full.txt" | tail -15 | tee -a "$OUT/pytest_gpu.txt"
}
cuda_tests() {  # the named test files on this machine's GPU (and its CPU)
    install_tree
    run_tests "$@"
}
rank_twice_bytecode_cached() {  # the 7B rank row twice, in pyc1/ and pyc2/, as a pip-installed torch starts
    log "the 7B rank row twice with bytecode cached, as after a pip install"
    bytecode_cached
    for i in 1 2; do
        python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/pyc$i" --only deltakit-rank --timeout 240 | grep "deltakit-rank\]"
        cli_overhead
    done
}
cuda_tests_each() {  # cuda_tests on each named file in a process of its own, verbose: an abort stops one file only
    install_tree
    for file in "$@"; do log "$file"; run_tests -v "$file"; done
}
bytecode_cached() {  # this image sets PYTHONDONTWRITEBYTECODE and ships torch without .pyc: every process compiles
    unset PYTHONDONTWRITEBYTECODE  # torch's 2141 modules; a user's install (pip compiles at install) does not
    export PYTHONPYCACHEPREFIX=/tmp/dk-pyc
    python3 -c "import torch, deltakit.analysis, deltakit.report, deltakit_cli.main" 2>/dev/null || true
}
nvidia-smi -L 2>/dev/null
# NVLink multicast stays off on shared hosts (the device tool's KINDS.md), also for torchrun's workers
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'

case "$PART" in
bench)
    rank_before
    log "rank, extract, merge (this tree)"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-extract,deltakit-merge --timeout 240
    log "DoRA vs LoRA merge"
    python3 -m bench.adapter_bench --preset 7b --workdir "$W" --out "$OUT/adapters" --device cuda --rank 64 --repeat 2
    log "resize rank 64 -> 16"
    python3 bench/resize_bench.py --preset 7b --workdir /tmp/dk-resize --out "$OUT/resize"
    ;;
more)
    log "CUDA paths against the CPU"
    cuda_tests tests/test_devices.py tests/test_spectral.py tests/test_metrics.py
    log "where rank's time goes per matrix"
    python3 -m bench.probes.rank_parts --device cuda --out "$OUT/parts"
    log "MoE slice"
    python3 -m bench.moe_bench --preset gpt-oss-20b --device cuda --workdir /tmp/dk-moe --out "$OUT/moe"
    rm -rf /tmp/dk-moe
    log "durability: fsync on and off"
    python3 bench/durability_bench.py --preset 7b --device auto --workdir /tmp/dk-durability --out "$OUT/durability" --repeats 2
    rm -rf /tmp/dk-durability
    ;;
rankab)
    rank_before
    log "rank after"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 200
    ;;
adaptive)
    log "per-matrix probe: adaptive vs full, 7B and 70B shapes"
    python3 -m bench.probes.adaptive_probe --device cuda --out "$OUT/probe" --repeats 2
    log "rank (adaptive) and rank --full-spectrum on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    ;;
final)
    rank_before
    log "rank (adaptive) and rank --full-spectrum"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    log "70B-shaped slice: memory and time"
    python3 bench/memory_bench.py --preset 70b --workdir /tmp/dk-mem --out "$OUT/memory"
    rm -rf /tmp/dk-mem
    log "CUDA paths against the CPU"
    cuda_tests tests/test_devices.py tests/test_spectral.py tests/test_metrics.py tests/test_adaptive.py \
        tests/test_memory.py tests/test_quantized_noise.py
    ;;
tune)
    log "the adaptive path's pieces"
    python3 -m bench.probes.adaptive_parts --device cuda --out "$OUT/parts"
    log "rank (adaptive) and rank --full-spectrum on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    log "where rank's time goes"
    python3 -m bench.probes.rank_profile "$W/base" "$W/ft" --device cuda --out "$OUT/profile"
    log "CUDA paths of the adaptive spectrum"
    cuda_tests tests/test_adaptive.py tests/test_devices.py
    ;;
quick)
    log "the adaptive path's pieces"
    python3 -m bench.probes.adaptive_parts --device cuda --out "$OUT/parts"
    log "rank (adaptive) on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 240
    log "the CLI around rank(): its own elapsed_s, and the interpreter, imports and CUDA start alone"
    cli_overhead
    log "where rank's time goes"
    python3 -m bench.probes.rank_profile "$W/base" "$W/ft" --device cuda --out "$OUT/profile"
    log "CUDA paths of the adaptive spectrum"
    cuda_tests tests/test_adaptive.py tests/test_spectral.py tests/test_devices.py
    ;;
s4)
    log "rank (adaptive) and rank --full-spectrum on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    cli_overhead
    cp "$W"/runs/deltakit-rank.json "$W"/runs/deltakit-rank-full.json "$OUT/new/"
    log "read and stream throughput by thread count"
    python3 -m bench.probes.read_paths "$W/base" "$W/ft" --device cuda --out "$OUT/read"
    log "the adaptive path's pieces"
    python3 -m bench.probes.adaptive_parts --device cuda --out "$OUT/parts"
    log "CUDA paths of the adaptive spectrum"
    cuda_tests tests/test_adaptive.py
    ;;
s5)
    log "rank adaptive, --full-spectrum and --full-spectrum --fp64, extract, on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" \
        --only deltakit-rank,deltakit-rank-full,deltakit-rank-fp64,deltakit-extract --timeout 300
    cli_overhead
    cp "$W"/runs/deltakit-rank*.json "$OUT/new/"
    log "plan variants against both references"
    python3 -m bench.probes.plan_variants "$W/base" "$W/ft" --device cuda --variant probes=64 --variant steps=96 \
        --reference full="$W/runs/deltakit-rank-full.json" --reference fp64="$W/runs/deltakit-rank-fp64.json" \
        --out "$OUT/variants" | cut -c1-1500
    log "CUDA paths"
    cuda_tests tests/test_adaptive.py tests/test_memory.py tests/test_spectral.py tests/test_devices.py
    ;;
s6)
    log "the adaptive path's pieces, sliced products"
    python3 -m bench.probes.adaptive_parts --device cuda --out "$OUT/parts"
    log "6 layers of the 7B pair, a profiler trace of rank on them"
    python3 -m bench.synth --preset 7b --layers 6 --workdir /tmp/dk-trace >/dev/null
    python3 -m bench.probes.rank_trace /tmp/dk-trace/base /tmp/dk-trace/ft --layers 6 --out "$OUT/trace"
    ;;
s7)
    log "the whole test suite on this machine (its GPU and CPU), in 8 groups of files at once"
    install_tree
    files=(tests/test_*.py)
    for g in 0 1 2 3 4 5 6 7; do
        group=()
        for i in "${!files[@]}"; do [ $((i % 8)) -eq $g ] && group+=("${files[$i]}"); done
        python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors "${group[@]}" > "$OUT/pytest_group_$g.txt" 2>&1 &
    done
    wait
    for g in 0 1 2 3 4 5 6 7; do tail -1 "$OUT/pytest_group_$g.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_group_$g.txt"; done \
        | tee "$OUT/pytest_gpu.txt"
    ;;
s9)
    bash "$0" s8
    rm -rf /tmp/dk-70b
    log "rank (adaptive) on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 200
    cli_overhead
    log "CUDA paths"
    cuda_tests tests/test_adaptive.py tests/test_memory.py tests/test_devices.py tests/test_hub.py tests/test_io.py
    ;;
s10)
    rank_and_full
    log "what rank's imports cost here, by module"
    python3 -X importtime -c "import deltakit.analysis, deltakit.report" 2>&1 | sort -t'|' -k2 -n | tail -12
    log "rank() by threads computing spectra"
    python3 -m bench.probes.rank_workers "$W/base" "$W/ft" --threads 1,2,3 --repeat 2 --out "$OUT/workers"
    log "a profiler trace of 6 layers on 2 threads"
    python3 -m bench.probes.rank_trace "$W/base" "$W/ft" --layers 6 --workers 2 --out "$OUT/trace" | head -40
    log "CUDA paths"
    cuda_tests tests/test_workers.py tests/test_adaptive.py tests/test_devices.py
    ;;
s11)
    rank_and_full
    log "rank() by threads computing spectra"
    python3 -m bench.probes.rank_workers "$W/base" "$W/ft" --threads 2,3,4 --repeat 2 --out "$OUT/workers"
    log "the tail's products: fp32 against a bf16 split"
    python3 -m bench.probes.split_products --out "$OUT/split"
    log "CUDA paths"
    cuda_tests tests/test_workers.py tests/test_adaptive.py
    ;;
s12)
    log "rank (adaptive) on the 7B pair (makes it)"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 240
    cli_overhead
    log "a fresh process's start, piece by piece, then rank() twice"
    python3 -m bench.probes.cold_start --base "$W/base" --ft "$W/ft" --out "$OUT/cold"
    log "the CLI three times more"
    for i in 1 2 3; do
        TIMEFORMAT="wall %R s"
        time deltakit rank "$W/base" "$W/ft" --json "$W/runs/again.json" --force -q
        python3 -c "import json; print('rank() elapsed_s', json.load(open('$W/runs/again.json'))['elapsed_s'])"
    done
    log "torch's import by module (cumulative, top 25)"
    python3 -X importtime -c "import deltakit.analysis, deltakit.report" 2> "$OUT/importtime.txt"
    sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -25
    ;;
s13)
    rank_and_full
    for i in 2 3; do
        log "rank (adaptive) again, run $i"
        python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/again$i" --only deltakit-rank --timeout 240 | grep "deltakit-rank\]"
        cli_overhead
    done
    log "a fresh process's start, piece by piece, then rank() twice"
    python3 -m bench.probes.cold_start --base "$W/base" --ft "$W/ft" --out "$OUT/cold"
    log "CUDA paths"
    cuda_tests tests/test_workers.py tests/test_adaptive.py tests/test_devices.py tests/test_memory.py tests/test_spectral.py \
        tests/test_io.py tests/test_cli_rank.py
    ;;
s14)
    bash "$0" s8
    python3 -c "import json; print('slice rank() elapsed_s', json.load(open('/tmp/dk-70b/runs/deltakit-rank.json'))['elapsed_s'])"
    rm -rf /tmp/dk-70b
    rank_and_full
    log "CUDA paths"
    cuda_tests tests/test_workers.py tests/test_adaptive.py tests/test_devices.py
    ;;
s15)
    log "CUDA paths of the streaming commands, 4 groups at once"
    install_tree
    groups=("tests/test_moe_quantized.py tests/test_quantized_noise.py" "tests/test_rank_models.py tests/test_hub.py"
            "tests/test_compare.py tests/test_intruders.py tests/test_trajectory.py" "tests/test_memory.py tests/test_workers.py tests/test_blocked.py")
    for g in 0 1 2 3; do
        python3 -m pytest -q -p no:cacheprovider ${groups[$g]} > "$OUT/pytest_group_$g.txt" 2>&1 &
    done
    wait
    for g in 0 1 2 3; do tail -1 "$OUT/pytest_group_$g.txt"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_group_$g.txt"; done \
        | tee "$OUT/pytest_gpu.txt"
    ;;
x2)
    install_tree
    log "the 7B rows in 1 and 2 processes"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/x2" --only deltakit-rank,deltakit-extract,deltakit-merge \
        --processes 2 --timeout 300 2>&1 | grep -E "floor|scaling"
    python3 -c "import json; [print(s) for s in json.load(open('$OUT/x2/results.json'))['scaling']]"
    log "rank, extract, merge, compare, DoRA merge: 1 process vs torchrun 2, compared"
    python3 -m bench.torchrun_compare --workdir /tmp/dk-x2 --pair "$W" --processes 2 --out "$OUT/compare" \
        --ops rank,extract,merge,compare,dora-merge 2>"$OUT/torchrun_compare.err" | grep '^{"op"'
    grep -E "Error|Traceback" "$OUT/torchrun_compare.err" | head -5
    ;;
x2b)
    install_tree
    python3 -m bench.synth --preset 7b --workdir "$W" >/dev/null &  # the 7B pair, meanwhile
    log "the distributed tests, NCCL's included"
    python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_distributed.py 2>&1 | tail -4 | tee "$OUT/pytest_x2.txt"
    wait
    log "extract, merge, DoRA merge, extract --budget, intruders --scale: 1 process vs torchrun 2, compared"
    python3 -m bench.torchrun_compare --workdir /tmp/dk-x2 --pair "$W" --processes 2 --out "$OUT/compare" \
        --ops extract,merge,dora-merge,extract-budget,intruders 2>"$OUT/torchrun_compare.err" | grep '^{"op"'
    grep -E "Error|Traceback" "$OUT/torchrun_compare.err" | head -5
    ;;
x2c)
    install_tree
    log "the CUDA tests of the threads, on both GPUs"
    cuda_tests tests/test_workers.py tests/test_adaptive.py tests/test_devices.py tests/test_memory.py tests/test_distributed.py
    log "rank on the demo pair, --device cuda:1 against cuda:0"
    python3 -c "from deltakit.demo import write_demo_pair; write_demo_pair('/tmp/dk-demo', force=True)"
    for d in 0 1; do python3 -m deltakit_cli.main rank /tmp/dk-demo/base /tmp/dk-demo/ft -q --device cuda:$d --json "$OUT/rank-cuda$d.json"; done
    python3 -c "
import json; a, b = (json.load(open('$OUT/rank-cuda%d.json' % d)) for d in (0, 1))
[x.pop(k) for x in (a, b) for k in ('elapsed_s', 'device')]
print('rank on cuda:1 equals cuda:0:', a == b)"
    ;;
pyc)
    log "is torch's bytecode cached? (a missing, unwritable __pycache__ compiles every module in every process)"
    python3 - <<'PY'
import importlib.util, os, sys, sysconfig
spec = importlib.util.find_spec("torch")
root = os.path.dirname(spec.origin)
cache = os.path.join(root, "__pycache__")
print("python", sys.version.split()[0], "torch at", root)
print("dont_write_bytecode", sys.flags.dont_write_bytecode, "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"),
      "pycache_prefix", sys.pycache_prefix)
print("torch/__pycache__ exists", os.path.isdir(cache), "writable", os.access(root, os.W_OK),
      "entries", len(os.listdir(cache)) if os.path.isdir(cache) else 0)
py = pyc = 0
for d, _, files in os.walk(root):
    py += sum(f.endswith(".py") for f in files)
    pyc += sum(f.endswith(".pyc") for f in files)
print(".py files", py, ".pyc files", pyc)
PY
    for i in 1 2; do
        python3 -X importtime -c "import torch" 2>&1 | tail -1
        /usr/bin/time -f "import torch: wall %e s, user %U s, sys %S s" python3 -c "import torch"
    done
    export PYTHONPYCACHEPREFIX=/tmp/dk-pyc
    for i in 1 2 3; do
        /usr/bin/time -f "import torch with PYTHONPYCACHEPREFIX, run $i: wall %e s, user %U s, sys %S s" python3 -c "import torch"
    done
    ;;
x2cp)
    bash "$0" pyc
    bash "$0" x2c
    ;;
g2)
    install_tree
    log "library calls on cuda:1 with cuda:0 current (bench/probes/second_gpu.py)"
    python3 -m bench.probes.second_gpu 2>&1 | tee "$OUT/second_gpu.txt"
    python3 -m bench.probes.second_gpu --steps noise:cuda:1,noise:cuda:1,rank:cuda:1 2>&1 | tee "$OUT/second_gpu_noise_first.txt"
    log "test_devices, cuda:1 only; then the two tests that failed in s16, blocking launches"
    python3 -m pytest -q -p no:cacheprovider tests/test_devices.py -k "cuda:1" 2>&1 | tail -5
    CUDA_LAUNCH_BLOCKING=1 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py \
        -k "cuda:1 and (rank_report or storage_noise)" > "$OUT/blocking.txt" 2>&1; tail -5 "$OUT/blocking.txt"
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    echo "compute-sanitizer: ${SAN:-none}"
    if [ -n "$SAN" ]; then
        timeout 240 "$SAN" --print-limit 20 python3 -m bench.probes.second_gpu --steps rank:cuda:1,noise:cuda:1 \
            > "$OUT/sanitizer.txt" 2>&1; head -60 "$OUT/sanitizer.txt"
    fi
    ;;
s17)
    install_tree
    python3 -c "import setuptools; print('setuptools', setuptools.__version__)"
    log "the CUDA tests that run on every GPU, both GPUs, one file per process"
    cuda_tests_each tests/test_devices.py tests/test_workers.py tests/test_adaptive.py tests/test_noise.py \
        tests/test_memory.py tests/test_distributed.py tests/test_quantized_noise.py
    grep -E "passed|failed|Fatal|Error" "$OUT/pytest_gpu_full.txt" | head -30
    log "library calls on cuda:1 with cuda:0 current, under compute-sanitizer"
    compute-sanitizer --print-limit 5 python3 -m bench.probes.second_gpu > "$OUT/sanitizer.txt" 2>&1
    grep -E "noise on|rank on|ERROR SUMMARY|Error" "$OUT/sanitizer.txt" | head -12
    log "rank (adaptive) and --full-spectrum on the 7B pair, as the image runs Python (no bytecode written)"
    rank_and_full
    python3 -m bench.probes.cli_timeline "$W/base" "$W/ft" --out "$OUT/timeline-image" --repeat 2
    rank_twice_bytecode_cached
    python3 -m bench.probes.cli_timeline "$W/base" "$W/ft" --out "$OUT/timeline-pyc" --repeat 2
    ;;
s18)
    install_tree
    bytecode_cached
    log "the 7B rank row with bytecode cached, then the CLI's timeline with its usual and a hard exit"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/pyc" --only deltakit-rank --timeout 240 | grep "deltakit-rank\]"
    cli_overhead
    python3 -m bench.probes.cli_timeline "$W/base" "$W/ft" --out "$OUT/timeline" --repeat 2
    python3 -m bench.probes.cli_timeline "$W/base" "$W/ft" --out "$OUT/timeline-hard" --repeat 2 --hard-exit
    ;;
s16)
    install_tree
    log "the threads' CUDA tests on both GPUs, one file per process, verbose"
    cuda_tests_each tests/test_workers.py tests/test_adaptive.py tests/test_devices.py tests/test_memory.py
    grep -E "PASSED|FAILED|ERROR|Error|error:|Aborted|Fatal" "$OUT/pytest_gpu_full.txt" | grep -v PASSED | head -40
    log "rank (adaptive) and --full-spectrum on the 7B pair, as the image runs Python (no bytecode written)"
    rank_and_full
    rank_twice_bytecode_cached
    /usr/bin/time -f "import torch with bytecode cached: wall %e s" python3 -c "import torch"
    ;;
s78)
    bash "$0" s7
    bash "$0" s8
    ;;
s8)
    log "a 70B-shaped slice: 8 layers of hidden 8192, intermediate 28672 (MHA), vocab 32000"
    python3 bench/run_bench.py --preset 7b --hidden 8192 --intermediate 28672 --layers 8 --workdir /tmp/dk-70b \
        --out "$OUT/slice70b" --only deltakit-rank,deltakit-rank-full --timeout 400
    ;;
final2)
    log "rank (adaptive) and rank --full-spectrum on the 7B pair"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank,deltakit-rank-full --timeout 240
    cli_overhead
    log "the same rank without CUDA graphs (DELTAKIT_CUDA_GRAPHS=0)"
    DELTAKIT_CUDA_GRAPHS=0 python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/nographs" --only deltakit-rank --timeout 240 | grep "deltakit-rank\]"
    log "CUDA paths"
    cuda_tests tests/test_adaptive.py tests/test_spectral.py tests/test_devices.py tests/test_metrics.py \
        tests/test_memory.py tests/test_quantized_noise.py
    ;;
trace)
    log "6 layers of the 7B pair"
    python3 -m bench.synth --preset 7b --layers 6 --workdir /tmp/dk-trace >/dev/null
    log "a profiler trace of rank on them"
    python3 -m bench.probes.rank_trace /tmp/dk-trace/base /tmp/dk-trace/ft --layers 6 --out "$OUT/trace"
    log "what import torch costs here"
    python3 -X importtime -c "import torch" 2>&1 | sort -t'|' -k2 -n | tail -12
    ;;
profile)
    log "rank on the 7B pair (makes the pair)"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 240
    log "where rank's time goes: stream alone, parts, rank"
    python3 -m bench.probes.rank_profile "$W/base" "$W/ft" --device cuda --out "$OUT/profile"
    ;;
compare)
    rank_before
    log "rank after, again"
    python3 bench/run_bench.py --preset 7b --workdir "$W" --out "$OUT/new" --only deltakit-rank --timeout 200
    log "compare vs rank"
    python3 -m bench.compare_bench --preset 7b --device cuda --workdir "$W" --out "$OUT/compare" --repeats 1
    ;;
esac
log done
