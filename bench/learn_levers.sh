#!/usr/bin/env bash
# The levers measured to choose the learner's defaults (docs/benchmarks.md, "What was
# measured to choose the defaults"): one `streamer bench learn` run per setting on the
# abrupt-shift world, seed 0, 100 entities x 2,000 steps; one JSON line per setting with the
# model's ratio to the oracle over the whole stream, in the 100 steps after the shift and
# after it, and the steps to recover. Then mse against huber loss on the two worlds where
# they differ most. About a minute per setting and world on a 2-core CPU, 15 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="STREAMER_LEARN_EPOCHS=1 STREAMER_LEARN_EARLY_UPDATES=false STREAMER_LEARN_WINDOW=64 STREAMER_LEARN_UPDATE_EVERY=8 STREAMER_LEARN_SHADOW_STEPS=4 STREAMER_LEARN_LEARNING_RATE=0.005"
E4="STREAMER_LEARN_EPOCHS=4 STREAMER_LEARN_EARLY_UPDATES=true STREAMER_LEARN_WINDOW=64 STREAMER_LEARN_UPDATE_EVERY=8 STREAMER_LEARN_SHADOW_STEPS=4 STREAMER_LEARN_LEARNING_RATE=0.01"
settings=(
  "before (1 epoch, window 64, every 8, lr 5e-3)|$OLD"
  "before, lr 1e-2|$OLD STREAMER_LEARN_LEARNING_RATE=0.01"
  "before, 4 epochs|$OLD STREAMER_LEARN_EPOCHS=4"
  "before, 4 epochs, early updates|$OLD STREAMER_LEARN_EPOCHS=4 STREAMER_LEARN_EARLY_UPDATES=true"
  "4 epochs, early, lr 1e-2|$E4"
  "4 epochs, early, lr 1e-2, drift detection|$E4 STREAMER_LEARN_DRIFT_DETECTION=true"
  "4 epochs, early, lr 1e-2, window 16|$E4 STREAMER_LEARN_WINDOW=16"
  "4 epochs, early, lr 1e-2, window 32|$E4 STREAMER_LEARN_WINDOW=32"
  "defaults (window 32, every 4, shadow 3)|"
  "defaults, 2 epochs|STREAMER_LEARN_EPOCHS=2"
)
summarise() {
  LABEL="$1" python3 -c '
import json, os, sys
for case in json.load(sys.stdin)["cases"]:
    m = case["model"]
    print(json.dumps({
        "setting": os.environ["LABEL"],
        "case": "%s/%s" % (case["world"], case["seed"]),
        "ratio_to_oracle": m["ratio_to_oracle"],
        "ratio_first_100_after_shift": m.get("ratio_first_100_after_shift"),
        "ratio_after_shift": m.get("ratio_after_shift"),
        "steps_to_recover": m.get("steps_to_recover"),
        "published_ratio_to_oracle": case["published"]["ratio_to_oracle"],
        "updates": case["learning"]["updates"],
        "rollbacks": case["learning"]["rollbacks"],
    }))'
}
for entry in "${settings[@]}"; do
  label="${entry%%|*}"
  vars="${entry#*|}"
  env $vars ./dev bench learn --worlds abrupt --seeds 0 --entities 100 --json 2>/dev/null |
    summarise "$label"
done
for loss in mse huber; do
  env STREAMER_LEARN_LOSS=$loss ./dev bench learn --worlds independent,garch_abrupt --seeds 1 \
    --entities 100 --json 2>/dev/null | summarise "defaults, loss $loss"
done
