#!/usr/bin/env bash
# The arm64 check: edge-qwen on emulated Cortex-A72 (Raspberry Pi 4) and Cortex-A76 (Pi 5) cores.
#
#   scripts/arm64-check.sh tiny [a72|a76 ...]        the tiny checkpoints (CI runs this, both cores)
#   scripts/arm64-check.sh real PACKAGE [a72|a76 ...]  a real package, exported on x86: Paris, and chat
#
# tiny: exports the tiny checkpoints' packages here (x86), then on each core runs the tests that need
# no torch against transformers' golden outputs (tests/test_golden.py), on packages exported there
# and on these x86 ones, plus the platform tests (tests/test_arm64.py, tests/test_targets.py). Any
# skipped test fails the check: on arm64, every one of them must run.
# Emulation checks correctness and which kernels run; it says nothing about speed.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "arm64-check: $*" >&2; }

TESTS=(tests/test_golden.py tests/test_arm64.py tests/test_targets.py tests/test_heap.py)

tiny() {
  local cpus=("$@") log
  [ ${#cpus[@]} -gt 0 ] || cpus=(a72 a76)
  mkdir -p "$HOME/.cache"  # the runner shares $HOME/.cache (not /tmp) with the emulated system
  packages=$(mktemp -d "$HOME/.cache/edge-qwen-x86-packages.XXXXXX")  # global: the EXIT trap removes it
  trap 'rm -rf "$packages"' EXIT
  python -m tests.golden --export "$packages" >&2
  for cpu in "${cpus[@]}"; do
    say "$cpu: ${TESTS[*]}"
    log=$(mktemp)
    if ! scripts/arm64.sh "$cpu" -- env EDGE_QWEN_ARM64_CPU="$cpu" EDGE_QWEN_X86_PACKAGES="$packages" \
        python3 -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}" -k "not transformers_computes" \
        2>&1 | tee "$log"; then
      say "$cpu: tests failed"; exit 1
    fi
    if grep -Eq '[0-9]+ skipped' "$log"; then
      say "$cpu: tests were skipped; on arm64 every one must run"; exit 1
    fi
    say "$cpu: passed; the x86 packages' distance from transformers on this core:"
    scripts/arm64.sh "$cpu" -- env EDGE_QWEN_HOME="$packages/home" python3 -m tests.golden --measure "$packages"
  done
}

real() {
  local package=$1; shift
  local cpus=("$@") out
  [ ${#cpus[@]} -gt 0 ] || cpus=(a72 a76)
  [ -f "$package/edge_qwen.json" ] || { say "$package is not a package (no edge_qwen.json)"; exit 1; }
  for cpu in "${cpus[@]}"; do
    say "$cpu: generate, greedy"
    out=$(scripts/arm64.sh "$cpu" -- edge-qwen generate "$package" \
      "What is the capital of France? Answer in one word." --temperature 0 --max-tokens 16)
    echo "$cpu: $out"
    grep -q Paris <<<"$out" || { say "$cpu: the answer has no Paris"; exit 1; }
    if [ "$cpu" = a76 ]; then
      say "$cpu: chat, two questions piped"
      printf 'What is the capital of France?\nAnd of Italy?\n' \
        | scripts/arm64.sh "$cpu" -- edge-qwen chat "$package" --temperature 0 --max-tokens 32
    fi
  done
}

case ${1:-} in
  tiny) shift; tiny "$@" ;;
  real) shift; [ $# -ge 1 ] || { say "usage: $0 real PACKAGE [a72|a76 ...]"; exit 2; }; real "$@" ;;
  *) say "usage: $0 tiny [a72|a76 ...] | real PACKAGE [a72|a76 ...]"; exit 2 ;;
esac
