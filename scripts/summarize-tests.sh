#!/bin/bash
# Adds up cmocka's per-binary results in a test log into one closing line.
log=$1
passed=$(grep -Eo '^\[  PASSED  \] [0-9]+ test' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '^\[  FAILED  \] [0-9]+ test' "$log" | awk '{s+=$4} END {print s+0}')
crashed=$(grep -c ': FAILED (exit' "$log")
echo
echo "tests: $passed passed, $((failed + crashed)) failed"
