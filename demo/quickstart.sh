#!/usr/bin/env bash
# The whole MAE path on the Fashion-MNIST subset in demo/fashion_mnist_small (2,000 train / 500 val images):
# pre-train a micro MAE -> picture its reconstructions -> fine-tune -> evaluate -> linear probe -> classify.
# Epochs can be shortened: PRETRAIN_EPOCHS, FINETUNE_EPOCHS, LINPROBE_EPOCHS; outputs go to OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# install only what is missing; an installed Paddle (a GPU build, say) is never replaced
if ! python -c "import paddle" 2>/dev/null; then
    pip install -q -r requirements.txt
elif ! python -c "import numpy, PIL, visualdl, simplejpeg" 2>/dev/null; then
    grep -v -e '^paddlepaddle' -e '^#' requirements.txt | pip install -q -r /dev/stdin
fi

OUT=${OUTPUT_DIR:-output_dir/quickstart}
PE=${PRETRAIN_EPOCHS:-20}
FE=${FINETUNE_EPOCHS:-10}
LE=${LINPROBE_EPOCHS:-10}
DATA=demo/fashion_mnist_small
COMMON=(--data_path "$DATA" --batch_size 64 --num_workers 0 --print_freq 100)
CLS=(--nb_classes 10 --warmup_epochs 1 --save_freq 1000)
step() { echo; echo "=== $* ==="; }

# pixel targets (no --norm_pix_loss), as the official reconstruction demos: a norm-pix model predicts each
# removed patch relative to its own unknown mean and std, which a picture can only guess
step "1/6 pre-train mae_vit_micro_patch4 for $PE epochs"
python main_pretrain.py --model mae_vit_micro_patch4 --mask_ratio 0.75 --epochs "$PE" \
    --warmup_epochs $((PE < 2 ? PE : 2)) --blr 2e-3 --save_freq 1000 "${COMMON[@]}" --output_dir "$OUT/pretrain" --log_dir "$OUT/pretrain"
PRETRAINED="$OUT/pretrain/checkpoint-$((PE - 1)).pd"

step "2/6 reconstructions of validation images"
python main_visualize.py --model mae_vit_micro_patch4 --resume "$PRETRAINED" --output "$OUT/reconstruction.png" --scale 6 \
    --img_path "$DATA"/val/0_t-shirt_top/00019.png "$DATA"/val/5_sandal/00008.png "$DATA"/val/8_bag/00018.png

step "3/6 fine-tune vit_micro_patch4 for $FE epochs"
python main_finetune.py --model vit_micro_patch4 --finetune "$PRETRAINED" --epochs "$FE" --blr 5e-3 \
    --aa none --reprob 0 --drop_path 0 "${CLS[@]}" "${COMMON[@]}" --output_dir "$OUT/finetune" --log_dir "$OUT/finetune"

step "4/6 evaluate the best fine-tuned checkpoint"
python main_finetune.py --model vit_micro_patch4 --eval --resume "$OUT/finetune/checkpoint-best.pd" \
    --nb_classes 10 "${COMMON[@]}"

step "5/6 linear probe for $LE epochs"
python main_linprobe.py --model vit_micro_patch4 --finetune "$PRETRAINED" --epochs "$LE" --blr 25.6 \
    "${CLS[@]}" "${COMMON[@]}" --output_dir "$OUT/linprobe" --log_dir "$OUT/linprobe"

step "6/6 classify a validation image"
python main_infer.py --model vit_micro_patch4 --resume "$OUT/finetune/checkpoint-best.pd" --data_path "$DATA" \
    --img_path "$DATA"/val/7_sneaker/00009.png --topk 3

step "outputs"
echo "pre-training:     $OUT/pretrain (checkpoint, log.txt, VisualDL: visualdl --logdir $OUT)"
echo "reconstructions:  $OUT/reconstruction.png"
echo "fine-tuning:      $OUT/finetune (checkpoint-best.pd, log.txt)"
echo "linear probing:   $OUT/linprobe (log.txt)"
python - "$OUT" <<'PY'
import json, sys
for name in ("pretrain", "finetune", "linprobe"):
    last = json.loads(open(f"{sys.argv[1]}/{name}/log.txt").read().splitlines()[-1])
    keys = ["train_loss"] + (["test_acc1"] if "test_acc1" in last else [])
    print(f"{name:9s} epoch {last['epoch']}: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys))
PY
