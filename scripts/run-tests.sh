#!/bin/bash
# Runs each cmocka test binary given, in order, and fails if any one fails
# (a crash counts as a failure). Output goes to stdout for the summary.
set -u
export CMOCKA_MESSAGE_OUTPUT=STDOUT
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
status=0
for t in "$@"; do
    echo "== $t"
    "$t" || { echo "== $t: FAILED (exit $?)"; status=1; }
done
exit $status
