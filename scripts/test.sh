#!/usr/bin/env bash
# Every test: the host tier (unit tests and tiny ring-3 guests on this host's /dev/kvm), then
# the lab tier (real Debian kernels, in the nested lab or directly where the CPU has vmx/svm).
set -euo pipefail
cd "$(dirname "$0")/.."
npm run build
npx ava 'dist/test/unit/**/*.test.js' 'dist/test/host/**/*.test.js'
node dist/test/lab/run-lab-tests.js
