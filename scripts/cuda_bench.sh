#!/usr/bin/env bash
# The CUDA checks and GPU figures of docs/BENCHMARKS.md in one run: the CUDA tests, vidprune
# bench of the ViTDet-B layout at 672 (32 streams), 1024 (8 streams) and 672 with 1 and 64
# streams, all in float16, profiles of dense, eventful and rollout's steady frames, and the
# relative-position attention kernels (scripts/attention_kernels.py).
#
#   scripts/cuda_bench.sh OUTDIR        (from the repository root, on a machine with CUDA)
#
# Each step has its own time limit and a failed step does not stop the next; OUTDIR gets
# cuda-tests.log, <run>.md / <run>.parquet per bench run, profile-*.txt and attention-kernels.txt.
set -u
out=${1:?usage: scripts/cuda_bench.sh OUTDIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$py -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

echo "== CUDA tests"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/models/methods/test_cuda.py \
    >"$out/cuda-tests.log" 2>&1
echo "exit $?"; tail -n 25 "$out/cuda-tests.log"

bench() {  # NAME LIMIT_S ARGS...: one vidprune bench run, its table kept as NAME.md/.parquet
    local name=$1 limit=$2; shift 2
    echo "== bench $name: $*"
    timeout "$limit" $py -m jobs.cli bench --device cuda --dtype float16 \
        --out "$out/run-$name" "$@" 2>&1 | grep -v "frame [0-9]*/"
    cp "$out/run-$name/bench.md" "$out/$name.md" && \
        cp "$out/run-$name/bench.parquet" "$out/$name.parquet"
    rm -rf "$out/run-$name"
}
bench b672s32 120 --model vitdet-b --resolution 672 --streams 32
bench b1024s8 100 --model vitdet-b --resolution 1024 --streams 8

bench b672s1 60 --model vitdet-b --resolution 672 --streams 1 --method eventful:r=220 \
    --method rollout:k=384 --memory-frames 0
bench b672s64 150 --model vitdet-b --resolution 672 --streams 64 --method eventful:r=220 \
    --method rollout:k=384 --method stgt:r=220 --repeats 2 --memory-frames 0

for m in none eventful:r=220 rollout:k=384; do
    echo "== profile $m"
    timeout 50 $py scripts/profile_method.py --model vitdet-b --resolution 672 --streams 32 \
        --method "$m" --device cuda --dtype float16 --rows 45 --shapes \
        >"$out/profile-${m%%:*}.txt" 2>&1
    grep "wall per frame" "$out/profile-${m%%:*}.txt"
done

echo "== attention kernels"
timeout 120 $py scripts/attention_kernels.py --device cuda --dtype float16 --batch 32 --grid 42 \
    --rows 384 >"$out/attention-kernels.txt" 2>&1
cat "$out/attention-kernels.txt"
