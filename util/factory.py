"""Model construction by name, for the scripts and for code written against the official repo, and the one
preparation every entry point gives a built model."""
import models_mae
import models_vit
from layer import set_recompute
from util.cpu_layer import attach_cpu_paths
from util.errors import CheckpointError

MODELS = models_mae.MODELS + models_vit.MODELS


def create_model(name, **kwargs):
    """Build a model by factory name; an unknown name raises ValueError listing the valid ones."""
    for module in (models_mae, models_vit):
        if name in module.MODELS:
            return getattr(module, name)(**kwargs)
    raise ValueError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")


def default_img_size(name):
    """The input size a factory builds for by default (no weights are allocated)."""
    import paddle
    with paddle.LazyGuard():
        return create_model(name).patch_embed.img_size[0]


def checkpoint_img_size(name, state, path):
    """The input size at which a checkpoint's state_dict was trained, from its pos_embed grid."""
    import numpy as np
    import paddle

    if "pos_embed" not in state:
        raise CheckpointError(f"{path}: no pos_embed")
    with paddle.LazyGuard():
        patch = create_model(name).patch_embed.patch_size[0]
    return int(round((np.shape(state["pos_embed"])[1] - 1) ** 0.5)) * patch


def prepare(model, recompute=False, distributed=False, trained=None):
    """Ready a built model for a script: with `trained` (sublayers: the linear probe's head, or partial
    fine-tuning's last blocks and head), every other parameter frozen; activation recomputation in every
    block with `recompute`; the CPU forwards (util.cpu_layer, a no-op on other devices); data parallelism
    over the processes with `distributed`. Returns (the model to call, the model itself: what checkpoints hold)."""
    if trained is not None:
        for p in model.parameters():
            p.stop_gradient = True
        for layer in trained:
            for p in layer.parameters():
                p.stop_gradient = False
    set_recompute(model, recompute)
    attach_cpu_paths(model)
    if distributed:
        import paddle
        return paddle.DataParallel(model), model
    return model, model
