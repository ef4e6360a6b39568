#!/usr/bin/env bash
# The GPU checks that the CPU cannot make, in one call on a machine with a GPU (its JAX, Flax and
# Optax; the project from this checkout, not installed). Each part has a time limit, so that one
# part that overruns leaves the others' results; the default parts stay within 9 minutes, under
# the 10 that a lent machine allows one command.
#
#   OUT=DIR bash benchmarks/gpu_checks.sh [PART ...]   # default parts: cheap tests
#   QUICK=1 TEST_PLATFORMS=cpu OUT=/tmp/g bash benchmarks/gpu_checks.sh cheap tests   # on a CPU
#
# Parts (results written flat into $OUT, default benchmarks/results/gpu):
#   cheap     python -m benchmarks.cheap on the MLP and the 1-D CNN (cheap-small.{json,md}), then
#             on ResNet-18 at batch 128 (cheap-resnet18.{json,md}): when=, LookSAM, Momentum-SAM
#             and base+norm(v) against the base step, and the state bytes DESIGN gives.
#   tests     the when=, LookSAM, Momentum-SAM and numerics tests with the GPU as JAX's backend;
#             those that need 8 devices skip.
#   contract  the optax contract every optimizer passes (tests/test_contract.py), the same way.
#   run       python -m benchmarks.run on ResNet-18 at batch 128 (benchmarks.{json,md}).
#   micro     python -m benchmarks.micro_batches on the CNN and ResNet-18 (micro_batches.{json,md}).
# Everything printed, the tests' output included, goes to gpu_checks.log, each part between
# '== NAME' lines that give its exit status and time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
quick=()
budget=(--budget 20)
if [[ -n ${QUICK:-} ]]; then
  quick=(--quick)
  budget=()
fi
python=${PYTHON:-python3}
log="$out/gpu_checks.log"
status=0

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND within LIMIT_S seconds, logs its outcome
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [[ $rc == 0 ]] || status=1
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
      part cheap-small 90 "$python" -m benchmarks.cheap --models mlp,cnn "${quick[@]}" \
        "${budget[@]}" --out "$out/cheap-small"
      part cheap-resnet18 270 "$python" -m benchmarks.cheap --models resnet18 "${quick[@]}" \
        "${budget[@]}" --out "$out/cheap-resnet18"
      for model in small resnet18; do  # flat in $OUT: a lent machine sends back 8 files at most
        for ext in json md; do
          [[ -f $out/cheap-$model/cheap.$ext ]] && mv "$out/cheap-$model/cheap.$ext" "$out/cheap-$model.$ext"
        done
        rmdir "$out/cheap-$model" 2>/dev/null
      done
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
      part run 400 "$python" -m benchmarks.run --models resnet18 "${quick[@]}" "${budget[@]}" \
        --device-note 'lent GPU machine, benchmarks/gpu_checks.sh' --out "$out"
      ;;
    micro)
      part micro 300 "$python" -m benchmarks.micro_batches --models cnn,resnet18 "${quick[@]}" \
        "${budget[@]}" --out "$out"
      ;;
    *)
      echo "unknown part: $name (cheap, tests, contract, run, micro)" | tee -a "$log"
      status=2
      ;;
  esac
done
exit $status
