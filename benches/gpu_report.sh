#!/usr/bin/env bash
# The GPU report: everything a lent GPU should run, in phases that each end within 9 minutes, every log
# and a summary written into OUT. Run on the GPU machine from the project root, with .gpu/ packed by
# ../shared/gpu/pack beside it:
#
#   bash benches/gpu_report.sh OUT [PHASE...]
#        phases: tests sanitize info bench train paper multimnist (default: the first five)
#
#   tests     every test executable with CAPSNET_REQUIRE_GPU=1 (a GPU test that cannot find the GPU fails)
#   sanitize  compute-sanitizer memcheck, then racecheck, over the CUDA tests
#   info      capsnet info
#   bench     training steps at batch 50 and 128 in fp32, tf32 and bf16 (replayed as CUDA graphs, and
#             in bf16 also launched one by one, --eager, for the graph's share), then every version of every
#             versioned op (bench --ops), then the PyTorch peer at the same batch sizes (fp32, tf32, and
#             bf16-autocast with torch.compile), same machine
#   train     the notebook's configuration, then its test accuracy (REPORT_EPOCHS, default 10; the
#             phase stops at 9 minutes, and the run resumes where it stopped on the next call)
#   paper     the same for --preset paper on MNIST (REPORT_PAPER_EPOCHS, default 30)
#   multimnist  the same for --preset paper on MultiMNIST (REPORT_MULTI_EPOCHS, default 10), its
#             error rate and per-digit accuracy on the test pairs
#
# Three device-tool calls cover it: "tests sanitize info", "bench", "train". OUT/summary.txt gets one
# line per phase (exit status, seconds) and the figures worth copying into docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benches/gpu_report.sh OUT [tests|sanitize|info|bench|train|paper|multimnist ...]}
shift
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(tests sanitize info bench train)
mkdir -p "$out"
[ -x .gpu/bin/capsnet ] || { echo "no .gpu/bin/capsnet: run ../shared/gpu/pack here first" >&2; exit 2; }
for d in /usr/local/cuda/bin /usr/local/cuda-13.0/bin; do [ -d "$d" ] && PATH="$PATH:$d"; done
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export CAPSNET_DATA="$PWD/.gpu/data/mnist" CAPSNET_REQUIRE_GPU=1
summary="$out/summary.txt"
limit=540  # seconds a phase may take
export out limit

note() { echo "$*" | tee -a "$summary"; }
# phase NAME: runs the function NAME in a shell of its own under the phase's time limit, logs to OUT/NAME.log
phase() {
  local name=$1
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "set -uo pipefail; $(declare -f run_to "$name"); $name" > "$out/$name.log" 2>&1
  local rc=$?
  note "$name: rc $rc, $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (stopped at the time limit)')"
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/gpu.txt" 2>&1
note "$(date -u +%FT%TZ) $(head -1 "$out/gpu.txt")"

tests() {
  local rc=0
  for t in .gpu/tests/*; do
    echo "=== $(basename "$t")"
    "$t" || rc=1
  done
  return $rc
}

sanitize() {
  local rc=0 exe
  exe=$(ls .gpu/tests/cuda-* | head -1)
  for tool in memcheck racecheck; do
    echo "=== compute-sanitizer --tool $tool $(basename "$exe")"
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$exe" --test-threads=1 || rc=1
  done
  return $rc
}

bench() {
  local b p
  for b in 50 128; do
    for p in fp32 tf32 bf16; do
      echo "=== precision $p"
      .gpu/bin/capsnet bench --device cuda --precision "$p" --batch-size "$b" --steps 20 --warmup 3
    done
    echo "=== precision bf16, eager"
    .gpu/bin/capsnet bench --device cuda --precision bf16 --batch-size "$b" --steps 20 --warmup 3 --eager
  done
  # every version of every versioned op, checked against the reference, then timed
  for b in 50 128; do
    .gpu/bin/capsnet bench --device cuda --ops --batch-size "$b" --steps 10
  done
  for b in 50 128; do
    for p in fp32 tf32; do
      python3 .gpu/bench/capsnet_torch_bench.py --mnist-dir .gpu/data/mnist --batch-size "$b" --precision "$p"
    done
    python3 .gpu/bench/capsnet_torch_bench.py --mnist-dir .gpu/data/mnist --batch-size "$b" \
      --precision bf16-autocast --compile
  done
}

info() { .gpu/bin/capsnet info; }

# run_to DIR FLAGS...: train into OUT/DIR (resuming a run left there), stopped in time for the
# evaluation of its best checkpoint within the phase
run_to() {
  local dir="$out/$1" resume=()
  shift
  [ -f "$dir/last.safetensors" ] && resume=(--resume)
  timeout --kill-after=10 $((limit - 60)) .gpu/bin/capsnet train --device cuda --checkpoint-dir "$dir" \
    "$@" "${resume[@]}"
  echo "=== eval (best.safetensors, test set)"
  .gpu/bin/capsnet eval --device cuda --checkpoint "$dir/best.safetensors"
}

train() { run_to run --epochs "${REPORT_EPOCHS:-10}"; }
paper() { run_to paper --preset paper --epochs "${REPORT_PAPER_EPOCHS:-30}"; }
multimnist() { run_to multimnist --dataset multimnist --preset paper --epochs "${REPORT_MULTI_EPOCHS:-10}"; }

for p in "${phases[@]}"; do
  case "$p" in
    tests | sanitize | info) phase "$p" ;;
    bench)
      phase bench
      grep -E "^=== precision|^batch |images/s|\"images_per_s\"" "$out/bench.log" | sed 's/^/  /' | tee -a "$summary" ;;
    train | paper | multimnist)
      phase "$p"
      grep -E "^epoch|test accuracy|per-digit" "$out/$p.log" | tail -4 | sed 's/^/  /' | tee -a "$summary" ;;
    *) echo "unknown phase $p (tests sanitize info bench train paper multimnist)" >&2; exit 2 ;;
  esac
done
