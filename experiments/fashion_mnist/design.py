"""What the study compares: the model, the label fractions, the methods and their names, where every recipe
search starts, and when a run counts as diverged."""
import math

MAE, VIT, SIZE = "mae_vit_micro_patch4", "vit_micro_patch4", 28
PERCENTS = (1, 10, 100)
MAE_BASED = ("finetune_mae", "partial_mae", "linprobe_mae")
COMPARED = ("finetune_mae", "finetune_scratch", "partial_mae", "linprobe_mae")
BASELINES = ("logreg_mae", "knn_mae", "logreg_pixels", "knn_pixels", "cnn", "cnn_vit_aug")
METHODS = {"finetune_mae": "fine-tune, MAE encoder", "partial_mae": "fine-tune the last block, MAE encoder",
           "linprobe_mae": "linear probe, MAE encoder", "finetune_scratch": "fine-tune, from scratch",
           "logreg_mae": "logistic regression, MAE features", "knn_mae": "kNN, MAE features",
           "logreg_pixels": "logistic regression, raw pixels", "knn_pixels": "kNN, raw pixels",
           "cnn": "small CNN, flips", "cnn_vit_aug": "small CNN, the ViTs' augmentation"}
RECIPE_START = {"crop_pct": "0.875", "crop_min": "0.08", "drop_path": "0", "weight_decay": "0.05", "longer": "1"}
DIVERGED = 2 * math.log(10)  # twice the loss of a uniform guess over the 10 classes
