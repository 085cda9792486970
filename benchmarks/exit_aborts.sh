#!/usr/bin/env bash
# Counts launches of `paratrain train` (2 ranks) that fail or abort at exit ("terminate called
# without an active exception", see the README's exit-time abort) while two busy loops load the
# cores. Usage: bash benchmarks/exit_aborts.sh [LAUNCHES]   (default 30; run from the repository)
set -u
n=${1:-30}
work=$(mktemp -d)
trap 'pkill -f "paratrain-busy-loop" 2>/dev/null; rm -rf "$work"' EXIT
for _ in 1 2; do python3 -c "import sys; sys.argv[0] = 'paratrain-busy-loop'
while True: pass" paratrain-busy-loop & done
bad=0
for i in $(seq 1 "$n"); do
  .venv/bin/paratrain train --model tiny --steps 3 --global-batch 8 --seq-len 32 --eval-every 0 --sample-tokens 0 \
    --quiet --no-checkpoint --out "$work/r$i" > "$work/o$i" 2> "$work/e$i"
  rc=$?
  if [ $rc -ne 0 ] || grep -q "terminate called\|Abort" "$work/e$i"; then bad=$((bad + 1)); echo "launch $i: rc $rc"; fi
done
echo "failed or aborted: $bad of $n launches"
