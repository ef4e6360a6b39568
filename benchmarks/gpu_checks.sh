#!/usr/bin/env bash
# The GPU checks that the CPU cannot make, in one call on a machine with a GPU (its JAX, Flax and
# Optax; the project from this checkout, not installed). Each part has a time limit, so that one
# part that overruns leaves the others' results; the limits of the default parts add up to 9
# minutes, under the 10 that a lent machine allows one command.
#
#   OUT=DIR bash benchmarks/gpu_checks.sh [PART ...]   # default parts: cheap tests
#   QUICK=1 TEST_PLATFORMS=cpu OUT=/tmp/g bash benchmarks/gpu_checks.sh cheap tests   # on a CPU
#
# Parts (results written into $OUT, default benchmarks/results/gpu):
#   cheap     python -m benchmarks.cheap on the MLP and the 1-D CNN (cheap-small.{json,md}), then
#             on ResNet-18 at batch 128 (cheap-resnet18.{json,md}): when=, LookSAM, Momentum-SAM
#             and base+norm(v) against the base step, and the state bytes DESIGN gives.
#   tests     the when=, LookSAM, Momentum-SAM and numerics tests with the GPU as JAX's backend;
#             those that need 8 devices skip.
#   contract  the optax contract every optimizer passes (tests/test_contract.py), the same way.
#   run       python -m benchmarks.run on ResNet-18 at batch 128 (benchmarks.{json,md}).
#   micro     python -m benchmarks.micro_batches on the CNN and ResNet-18 (micro_batches.{json,md}).
#   parallel  python -m benchmarks.parallel on the MLP, the CNN and ResNet-18 (parallel.{json,md}):
#             SAMPa's vmapped pair against SAM and the base step (two-device cases with 2 GPUs).
#   lm        the language-model example at twice its default width (language_model.{json,md}):
#             AdamW, SAM, Functional-SAM and preconditioned Functional-SAM step times on the GPU.
# A lent machine allows 10 minutes per command and sends back at most 8 files: the default parts
# write 5 files, run, micro, parallel and lm 2 each, so contract, run, micro, parallel and lm go
# in a call of their own
# (the script warns when $OUT holds more than 8 files).
# Everything printed, the tests' output included, goes to gpu_checks.log, each part between
# '== NAME' lines that give its exit status and time. Without QUICK the benchmarks run only on a
# GPU (JAX_PLATFORMS=cuda): a machine whose GPU JAX cannot start fails them instead of measuring
# its CPU. Exit status: 0 when every part passed, 1 when one failed, 2 for an unknown part.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quick=()
budget=(--budget 20)
bench_platforms=cuda
if [[ -n ${QUICK:-} ]]; then
  quick=(--quick)
  budget=()
  bench_platforms=${JAX_PLATFORMS:-}
fi
python=${PYTHON:-python3}
log="$out/gpu_checks.log"
status=0

fail() {  # fail STATUS: the script's exit status becomes the larger of the two
  ((status = $1 > status ? $1 : status))
}

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND within LIMIT_S seconds, logs its outcome
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$([[ $rc == 124 ]] && echo ' (time limit)') after $((SECONDS - start)) s" |
    tee -a "$log"
  [[ $rc == 0 ]] || fail 1
}

bench() {  # bench NAME LIMIT_S ARGS...: a benchmark module, on the GPU unless QUICK is set
  JAX_PLATFORMS=$bench_platforms part "$@"
}

flatten() {  # flatten DIR: DIR/cheap.{json,md} become DIR.{json,md}, beside the other results
  local ext
  for ext in json md; do
    [[ -f $1/cheap.$ext ]] && mv "$1/cheap.$ext" "$1.$ext"
  done
  rmdir "$1" 2>/dev/null
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo 'no nvidia-smi'
} 2>&1 | tee -a "$log"
if ! "$python" -c 'import jax, optax, sys; print(sys.version.split()[0], "jax", jax.__version__,
"optax", optax.__version__, jax.default_backend(), jax.devices())' 2>&1 | tee -a "$log"; then
  echo "$python cannot import jax and optax: nothing checked" | tee -a "$log"
  exit 1
fi

for name in ${*:-cheap tests}; do
  case $name in
    cheap)
      bench cheap-small 120 "$python" -m benchmarks.cheap --models mlp,cnn "${quick[@]}" \
        "${budget[@]}" --out "$out/cheap-small"
      flatten "$out/cheap-small"
      bench cheap-resnet18 240 "$python" -m benchmarks.cheap --models resnet18 "${quick[@]}" \
        "${budget[@]}" --out "$out/cheap-resnet18"
      flatten "$out/cheap-resnet18"
      ;;
    tests)
      JAX_PLATFORMS=${TEST_PLATFORMS:-cuda} part tests 180 "$python" -m pytest -q -n 0 \
        tests/test_when.py tests/test_look_sam.py tests/test_momentum_sam.py \
        tests/test_numerics.py
      ;;
    contract)
      JAX_PLATFORMS=${TEST_PLATFORMS:-cuda} part contract 300 "$python" -m pytest -q -n 0 \
        tests/test_contract.py
      ;;
    run)
      bench run 400 "$python" -m benchmarks.run --models resnet18 "${quick[@]}" "${budget[@]}" \
        --device-note 'lent GPU machine, benchmarks/gpu_checks.sh' --out "$out"
      ;;
    micro)
      bench micro 300 "$python" -m benchmarks.micro_batches --models cnn,resnet18 "${quick[@]}" \
        "${budget[@]}" --out "$out"
      ;;
    parallel)
      bench parallel 300 "$python" -m benchmarks.parallel --models mlp,cnn,resnet18 "${quick[@]}" \
        "${budget[@]}" --out "$out"
      ;;
    lm)
      lm_size=(--width 128 --layers 4 --steps 1000)
      [[ -n ${QUICK:-} ]] && lm_size=(--quick)
      bench lm 300 "$python" -m optax_sam.examples.language_model "${lm_size[@]}" --out "$out"
      ;;
    *)
      echo "unknown part: $name (cheap, tests, contract, run, micro, parallel, lm)" | tee -a "$log"
      fail 2
      ;;
  esac
done
files=$(find "$out" -type f | wc -l)
if ((files > 8)); then
  echo "warning: $out holds $files files; a lent machine sends back 8 at most" | tee -a "$log"
fi
exit $status
