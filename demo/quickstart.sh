#!/usr/bin/env bash
# Quickstart: load an official-format MAE checkpoint (tiny, shipped for tests) without PyTorch and reconstruct.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUTPUT_DIR:-./output_dir/quickstart}
mkdir -p "$out"
python -m util.convert_weights tests/golden/mae_tiny.pth "$out/mae_tiny.pd"
python - "$out/mae_tiny.pd" <<'PY'
import sys
import numpy as np
import paddle
from layer import LayerNorm
from models_mae import MaskedAutoencoderViT

model = MaskedAutoencoderViT(32, 4, 3, 64, 2, 4, 32, 2, 4, 4.0, LayerNorm, norm_pix_loss=True)
model.set_state_dict(paddle.load(sys.argv[1])["model"])
model.eval()
io = np.load("tests/golden/mae_tiny_io.npz")
loss, pred, mask = model(paddle.to_tensor(io["imgs"]), 0.75, noise=paddle.to_tensor(io["noise"]))
print(f"loss {loss.item():.6f} (official PyTorch: {float(io['loss']):.6f}); masked patches per image: "
      f"{mask.sum(1).numpy().tolist()}")
PY
