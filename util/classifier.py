"""A classifier rebuilt from its checkpoint, and the inputs and class names of inference."""
import os

import numpy as np

import models_vit
from util.datasets import load_image
from util.image_index import IMG_EXTENSIONS, class_difference, class_folders
from util.factory import checkpoint_img_size
from util.pos_embed import interpolate_pos_embed
from util.errors import CheckpointError, DataError
from util.weights import load_checkpoint, load_model_weights
from util.checkpoint import recorded_classes, recorded_flags

IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")


def classifier_from_checkpoint(model_name, path, input_size=None):
    """Build `model_name` with the head, pooling and input size the checkpoint was trained with
    (a fine-tuned or linear-probing checkpoint of ours, or an official fine-tuned .pth)."""
    ckpt = load_checkpoint(path)
    state = dict(ckpt["model"])
    probe = "head.1.weight" in state
    head = state.get("head.1.weight" if probe else "head.weight")
    if head is None:
        raise CheckpointError(f"{path}: no classifier head (head.weight); is it a pre-training checkpoint?")
    native = checkpoint_img_size(model_name, state, path)
    model = getattr(models_vit, model_name)(num_classes=int(head.shape[1]), global_pool="fc_norm.weight" in state,
                                            img_size=input_size or native)
    if probe:
        models_vit.add_bn_head(model)
    interpolate_pos_embed(model, state)
    load_model_weights(model, state, path)
    model.eval()
    model.class_names = recorded_classes(ckpt)  # recorded by fine-tuning and linear probing
    check_recorded_classes(model.class_names, model.num_classes, path)
    model.crop_pct = recorded_flags(ckpt).get("crop_pct")  # the evaluation it was trained with (None: the official)
    return model


def check_recorded_classes(names, num_classes, path):
    """Recorded training class names (or None) must be names, at most one per output of the head."""
    if names is not None and (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)
                              or len(names) > num_classes):
        raise CheckpointError(f"{path}: its recorded classes are not a list of at most {num_classes} names, one "
                              "per output of its head")


def class_names(path=None, data_path=None, num_classes=1000, recorded=None):
    """Names from a text file (one per line), the class folders of a dataset (they must be those the model
    recorded, if it did), those the model recorded (its checkpoint's training classes), or ImageNet's for 1000
    classes; else the class numbers. A model with more outputs than the classes it recorded (--nb_classes
    above the class folders, as the official allows) was trained on label i = class i: its other outputs are
    named `<no class i>`, never another list's names."""
    if path:
        if not os.path.isfile(path):
            raise DataError(f"{path}: class names file not found")
        try:
            with open(path, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except (UnicodeDecodeError, OSError) as e:
            raise DataError(f"{path}: not a text file of class names ({type(e).__name__})") from None
    elif data_path:
        root = os.path.join(data_path, "train") if os.path.isdir(os.path.join(data_path, "train")) else data_path
        if not os.path.isdir(root):
            raise DataError(f"{root}: dataset folder not found")
        names = [name for name, _ in class_folders(root)]
        if recorded and names != list(recorded):
            raise DataError(f"{root}: class folders differ from the classes the model was trained on "
                            f"({class_difference(names, recorded)})")
        if recorded:
            return class_names(num_classes=num_classes, recorded=recorded)
    elif recorded:
        return list(recorded) + [f"<no class {i}>" for i in range(len(recorded), num_classes)]
    elif num_classes == 1000:
        return class_names(IMAGENET_CLASSES)
    else:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{path or data_path}: {len(names)} class names for a {num_classes}-class model")
    return names


def image_paths(paths):
    """Files as given, and the images inside folders (sorted); a missing path is an error."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, n) for n in os.listdir(p) if n.lower().endswith(IMG_EXTENSIONS))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"{p}: image not found")
    if not out:
        raise DataError(f"no images in {', '.join(paths)}")
    return out


def load_batch(paths, transform):
    """Decode and transform these images (a bad file is named by load_image): an NCHW float32 tensor on the
    device, uploaded as uint8."""
    return transform.batch(np.stack([transform(load_image(p)) for p in paths]))
