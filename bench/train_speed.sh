#!/bin/bash
# Seconds per training iteration of `allspark-seg train` (allspark recipe, full-width MiT-B0, 2 labeled + 2 unlabeled
# images, synthetic data with 6 classes, memory read after the warm-up, data loading in the main process included)
# at crops 128 and 256, fp32 and bf16. Run from the repository root with the package installed; on an idle machine.
#   bash bench/train_speed.sh [OUT]       (THREADS=2 ITERS=30 by default)
set -euo pipefail
out=${1:-runs/train_speed}
export OMP_NUM_THREADS=${THREADS:-2}
mkdir -p "$out"
for crop in 128 256; do
  for prec in fp32 bf16; do
    run="$out/b0_${crop}_${prec}"
    rm -rf "$run"
    allspark-seg train -c configs/synthetic_demo.yaml --out "$run" --set method=allspark model.encoder=mit_b0 \
      model.embed_dims=null model.depths=null model.num_heads=null model.head_dim=768 model.drop_path=0.1 \
      train.optimizer=sgd train.lr=0.001 train.lr_multi=10.0 train.weight_decay=0.0001 \
      data.root="$out/data" data.synthetic.image_size=256 data.synthetic.num_classes=6 data.synthetic.num_labeled=8 \
      data.synthetic.num_unlabeled=32 data.synthetic.num_val=2 data.crop_size=$crop \
      train.iterations="${ITERS:-30}" train.batch_size=2 train.log_every=5 train.eval_every=100000 \
      train.checkpoint_every=100000 train.precision=$prec > "$run.log" 2>&1 || { tail -3 "$run.log"; exit 1; }
    python - "$run" "$crop" "$prec" <<'PY'
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
times = [r["sec_per_iter"] for r in rows if r["type"] == "train"][1:]  # the first window includes warm-up
print(f"B0 crop {sys.argv[2]} {sys.argv[3]}: {statistics.median(times):.3f} s/iteration (median of {len(times)} windows)")
PY
  done
done
