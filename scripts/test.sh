#!/usr/bin/env bash
# Every test, each where this machine can run it (test/runner/run-tests.ts): unit tests here;
# KVM tests here if /dev/kvm works, else in the nested lab; Linux guests here if the CPU has
# vmx/svm, else in the nested lab. One lab boot at most (plus one fresh boot if it freezes).
set -euo pipefail
cd "$(dirname "$0")/.."
npm run build
node dist/test/runner/run-tests.js "$@"
