"""Convert an official MAE PyTorch checkpoint to this project's format.

    python -m util.convert_weights SRC.pth DST.pd
"""
import argparse
import os

from util.args import add_cache_arg, checkpoint_file
from util.errors import WriteError, run
from util.weights import load_checkpoint, save_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official .pth checkpoint (torch zip format), or a released name")
    parser.add_argument("dst", help="output .pd file, {'model': state_dict}")
    add_cache_arg(parser)
    args = parser.parse_args(argv)
    args.src = checkpoint_file(parser, "src", args.src, args.cache_dir)
    if os.path.exists(args.dst) and os.path.exists(args.src) and os.path.samefile(args.src, args.dst):
        parser.error(f"argument dst: {args.dst} is the source file; choose another output path")
    ckpt = load_checkpoint(args.src)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
        save_file({"model": ckpt["model"]}, args.dst)
    except OSError as e:
        raise WriteError(f"cannot write {args.dst}: {e}") from None
    print(f"wrote {args.dst}: {len(ckpt['model'])} tensors")


if __name__ == "__main__":
    run(main)
