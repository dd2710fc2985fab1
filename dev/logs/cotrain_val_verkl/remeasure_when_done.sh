#!/bin/bash
# Remeasure each new run (remeasure.sh, the PLAN's command) as soon as its driver JSON exists, one at a time.
D=/work/main/dev/logs/cotrain_val_verkl
declare -A done_
while [ ${#done_[@]} -lt 6 ]; do
  for arm in kl lr; do for s in 1 2 3; do
    tag=val${arm}_cotrain_s$s
    if [ -z "${done_[$tag]}" ] && [ -f $D/$arm/cotrain_s$s.json ]; then
      echo "$(date -u +%H:%M:%S) remeasure $tag"; bash $D/remeasure.sh $tag; done_[$tag]=1
    fi
  done; done
  sleep 60
done
echo "$(date -u +%H:%M:%S) all remeasured"
