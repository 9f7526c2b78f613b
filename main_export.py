"""Export a classifier for deployment: Paddle Inference (paddle.jit.save) and, optionally, ONNX.

    python main_export.py --model vit_base_patch16 --resume mae_finetuned_vit_base.pth --output export/vit_base
    python main_infer.py --exported export/vit_base --img_path cat.jpg

Writes OUTPUT.json + OUTPUT.pdiparams (the static program and weights; input [batch, 3, size, size],
ImageNet-normalised, output logits) and OUTPUT.info (JSON: model name, input size, classes, the SHA-256 of
the other two, so that files of different exports are not mixed up). With --onnx,
also OUTPUT.onnx through paddle2onnx (pip install paddle2onnx).
"""
import util  # noqa: F401  (first: keeps Paddle's import-time ccache warning off the console)
import argparse
import json
import os

import paddle

import models_vit
from layer import set_fused_attention
from util.args import add_cache_arg, check_model_input, checkpoint_file, positive_int
from util.classifier import classifier_from_checkpoint
from util.errors import LaunchError, WriteError, run
from util.files import file_digest, write_text


def get_args_parser():
    parser = argparse.ArgumentParser("Export an MAE classifier", add_help=True)
    parser.add_argument("--model", default="vit_base_patch16", choices=models_vit.MODELS)
    parser.add_argument("--resume", required=True, help="classifier checkpoint (.pd, or an official fine-tuned .pth)")
    parser.add_argument("--output", required=True, help="output path prefix, e.g. export/vit_base")
    parser.add_argument("--input_size", default=None, type=positive_int)
    parser.add_argument("--onnx", action="store_true", help="also write OUTPUT.onnx with paddle2onnx")
    add_cache_arg(parser)
    return parser


def export(args):
    paddle.set_device("cpu")
    model = classifier_from_checkpoint(args.model, args.resume, args.input_size)
    set_fused_attention(model, False)  # attention written out: every Paddle Inference and ONNX backend runs it
    size = model.patch_embed.img_size[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    spec = [paddle.static.InputSpec([None, 3, size, size], "float32", name="image")]
    paddle.jit.save(model, args.output, input_spec=spec)
    write_text(args.output + ".info", json.dumps(
        {"model": args.model, "input_size": size, "num_classes": model.num_classes, "class_names": model.class_names,
         "crop_pct": model.crop_pct, "source": os.path.abspath(args.resume),
         "sha256": {ext: file_digest(args.output + ext) for ext in (".json", ".pdiparams")}}, indent=1))
    print(f"wrote {args.output}.json, {args.output}.pdiparams, {args.output}.info")
    if args.onnx:
        try:
            import paddle2onnx
        except ImportError:
            raise LaunchError("--onnx needs paddle2onnx (pip install paddle2onnx)") from None
        paddle2onnx.export(args.output + ".json", args.output + ".pdiparams", args.output + ".onnx")
        print(f"wrote {args.output}.onnx")


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_model_input(parser, args.model, args.input_size, models_vit.MODELS)
    args.resume = checkpoint_file(parser, "--resume", args.resume, args.cache_dir)
    if not os.path.basename(args.output) or os.path.isdir(args.output):
        folder = args.output.rstrip(os.sep) or "export"
        parser.error(f"argument --output: {args.output!r} is a folder, not a path prefix; give one such as "
                     f"{os.path.join(folder, 'model')}")
    try:
        export(args)
    except OSError as e:
        raise WriteError(f"cannot write {args.output}: {e.strerror or e}") from None


if __name__ == "__main__":
    run(main)
