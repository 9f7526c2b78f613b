"""Classify images with a fine-tuned (or linear-probing) checkpoint, or with an exported model.

    python main_infer.py --model vit_base_patch16 --resume mae_finetuned_vit_base.pth --img_path cat.jpg
    python main_infer.py --exported export/vit_base --img_path photos/ --json
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import contextlib
import json
import os
import sys

import numpy as np
import paddle

import models_vit
from util.args import (add_cache_arg, check_environment, check_model_input, checkpoint_file, crop_fraction, device,
                       positive_int)
from util.classifier import (check_recorded_classes, class_names, classifier_from_checkpoint, image_paths,
                             load_batch)
from util.cpu import configure_cpu, cpu_threads
from util.transforms import eval_transform
from util.errors import CheckpointError, run
from util.files import file_digest
from util.factory import prepare


def get_args_parser():
    parser = argparse.ArgumentParser("MAE image classification inference", add_help=True)
    parser.add_argument("--img_path", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--model", default="vit_base_patch16", choices=models_vit.MODELS)
    parser.add_argument("--resume", default="", help="classifier checkpoint (.pd, or an official fine-tuned .pth)")
    parser.add_argument("--exported", default="", help="path prefix of a model written by main_export.py")
    parser.add_argument("--input_size", default=None, type=positive_int,
                        help="default: the size the checkpoint was trained at")
    parser.add_argument("--topk", default=5, type=positive_int)
    parser.add_argument("--crop_pct", default=None, type=crop_fraction,
                        help="resize to input_size / crop_pct, centre-crop; default the one the model was trained "
                             "with (its checkpoint's --crop_pct), else the official 224/256")
    parser.add_argument("--class_names", default="", help="text file with one class name per line")
    parser.add_argument("--data_path", default="", help="take class names from this dataset's class folders")
    parser.add_argument("--batch_size", default=16, type=positive_int)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--device", default="gpu" if paddle.is_compiled_with_cuda() else "cpu", type=device)
    add_cache_arg(parser)
    return parser


@contextlib.contextmanager
def native_stdout_silenced():
    """Paddle Inference prints progress and debugging lines to the C-level stdout (its errors come as
    exceptions); keep stdout for results (--json) and the console for messages that matter."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class ExportedModel:
    """A model saved by main_export.py, run with Paddle Inference."""

    def __init__(self, prefix, device):
        info_path = prefix + ".info"
        for path in (prefix + ".json", prefix + ".pdiparams", info_path):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: exported model file not found")
        try:
            with open(info_path, encoding="utf-8") as f:
                self.info = json.load(f)
            int(self.info["input_size"]), int(self.info["num_classes"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{info_path}: not an export description ({type(e).__name__}: {e})") from None
        for ext, digest in (self.info.get("sha256") or {}).items():
            if file_digest(prefix + ext) != digest:
                raise CheckpointError(f"{prefix + ext}: not the file {info_path} was exported with (its SHA-256 "
                                      "differs); export again or keep the files of one export together")
        config = paddle.inference.Config(prefix + ".json", prefix + ".pdiparams")
        config.disable_glog_info()  # the optimisation passes' progress lines
        if device.startswith("gpu"):
            config.enable_use_gpu(256, int(device.partition(":")[2] or 0))  # MB of the initial memory pool, GPU
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(cpu_threads())
            config.enable_onednn()
        try:
            with native_stdout_silenced():
                self.predictor = paddle.inference.create_predictor(config)
            size = int(self.info["input_size"])
            out = self(np.zeros((1, 3, size, size), np.float32))
        except (RuntimeError, ValueError, OSError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{prefix}.json/.pdiparams: Paddle Inference cannot run them ({reason})") from None
        if list(out.shape) != [1, int(self.info["num_classes"])]:
            raise CheckpointError(f"{prefix}: the program gives {list(out.shape)} for one image, {info_path} says "
                                  f"{self.info['num_classes']} classes; the files come from different exports")
        check_recorded_classes(self.info.get("class_names"), int(self.info["num_classes"]), info_path)

    def __call__(self, x):
        """Logits [N, classes] (NumPy) of an NCHW float32 batch (a tensor or an array: Paddle Inference takes host
        memory)."""
        x = x.numpy() if isinstance(x, paddle.Tensor) else x
        inp = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        inp.reshape(list(x.shape))
        inp.copy_from_cpu(np.ascontiguousarray(x, dtype=np.float32))
        with native_stdout_silenced():
            self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()


def predict(args):
    """Top-k (ids, probabilities) per image, and the class names. Images are decoded a batch at a time (memory
    holds one batch, not the folder); nothing is returned before the last one, so a bad file stops the run
    before any output."""
    paddle.set_device(args.device)
    if args.device == "cpu":
        configure_cpu()
    paths = image_paths(args.img_path)
    if args.exported:
        model = ExportedModel(args.exported, args.device)
        input_size, num_classes = model.info["input_size"], model.info["num_classes"]
        recorded, crop_pct = model.info.get("class_names"), model.info.get("crop_pct")
        forward = model
    else:
        if not args.resume:
            raise CheckpointError("--resume or --exported is required")
        model = prepare(classifier_from_checkpoint(args.model, args.resume, args.input_size))[0]
        input_size, num_classes = model.patch_embed.img_size[0], model.num_classes
        recorded, crop_pct = model.class_names, model.crop_pct

        def forward(x):
            with paddle.no_grad():
                return model(x).numpy()

    names = class_names(args.class_names, args.data_path, num_classes, recorded)
    transform, k = eval_transform(input_size, args.crop_pct or crop_pct), min(args.topk, num_classes)
    step = args.batch_size
    ranked = [top_k(forward(load_batch(paths[i:i + step], transform)), k) for i in range(0, len(paths), step)]
    return paths, np.concatenate([r[0] for r in ranked]), np.concatenate([r[1] for r in ranked]), names


def top_k(logits, k):
    """The k most probable classes of each row (ids, softmax probabilities); ties keep the lower id first."""
    logits = logits - logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(probs, top, 1)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_vit.MODELS)
    check_environment(parser)
    args.resume = checkpoint_file(parser, "--resume", args.resume, args.cache_dir)
    with contextlib.redirect_stdout(sys.stderr):  # what loading says goes to the console: stdout holds results
        paths, top, probs, names = predict(args)
    for path, ids, p in zip(paths, top, probs):
        if args.json:
            print(json.dumps({"path": path, "topk_ids": ids.tolist(), "topk_names": [names[i] for i in ids],
                              "topk_probs": [round(float(v), 6) for v in p]}))
        else:
            print(path)
            for rank, (i, v) in enumerate(zip(ids, p), 1):
                print(f"  {rank}. {names[i]} ({i}): {v:.4f}")


if __name__ == "__main__":
    run(main)
