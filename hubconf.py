"""Entry points for paddle.hub:

    model = paddle.hub.load(REPO_DIR, "vit_base_patch16", source="local", pretrained=True)

Every factory of models_mae.py and models_vit.py is an entry point. pretrained=True loads the official
release for it (the fine-tuned classifiers for vit_*, the whole MAE with its decoder, mae_visualize_vit_*,
for mae_vit_*), fetched once into the cache of util.hub; checkpoint= takes any checkpoint path or released
name instead. Classifiers carry `class_names` when their checkpoint recorded them (this project's
fine-tuning and linear probing do).
"""
import util as _util  # noqa: F401  (first: filters Paddle's import-time warnings)
import models_mae as _models_mae
import models_vit as _models_vit
from util.checkpoint import recorded_flags as _recorded_flags
from util.classifier import classifier_from_checkpoint as _classifier_from_checkpoint
from util.factory import checkpoint_img_size as _checkpoint_img_size
from util.hub import resolve as _resolve
from util.weights import load_checkpoint as _load_checkpoint
from util.weights import load_model_weights as _load_model_weights

dependencies = ["paddle", "numpy", "PIL", "simplejpeg"]  # every package importing this file loads

_SIZES = (("base", 16), ("large", 16), ("huge", 14))
_RELEASE_OF = {**{f"vit_{s}_patch{p}": f"mae_finetuned_vit_{s}" for s, p in _SIZES},
               **{f"mae_vit_{s}_patch{p}": f"mae_visualize_vit_{s}" for s, p in _SIZES}}


def _source(name, pretrained, checkpoint):
    if checkpoint:
        return _resolve(checkpoint)
    if not pretrained:
        return None
    if name not in _RELEASE_OF:
        raise ValueError(f"{name}: no released checkpoint; pass checkpoint=PATH")
    return _resolve(_RELEASE_OF[name])


def _mae(name):
    def entry(pretrained=False, checkpoint=None, **kwargs):
        path = _source(name, pretrained, checkpoint)
        if path is None:
            return getattr(_models_mae, name)(**kwargs)
        ckpt = _load_checkpoint(path)
        kwargs.setdefault("img_size", _checkpoint_img_size(name, ckpt["model"], path))
        kwargs.setdefault("norm_pix_loss", bool(_recorded_flags(ckpt).get("norm_pix_loss", False)))
        model = getattr(_models_mae, name)(**kwargs)
        _load_model_weights(model, ckpt["model"], path)
        return model.eval()
    entry.__doc__ = f"MAE {name}; pretrained=True: {_RELEASE_OF.get(name, 'none released')}."
    return entry


def _classifier(name):
    def entry(pretrained=False, checkpoint=None, **kwargs):
        path = _source(name, pretrained, checkpoint)
        if path is None:
            return getattr(_models_vit, name)(**kwargs)
        return _classifier_from_checkpoint(name, path, kwargs.get("img_size"))
    entry.__doc__ = f"ViT classifier {name}; pretrained=True: {_RELEASE_OF.get(name, 'none released')}."
    return entry


globals().update({name: _mae(name) for name in _models_mae.MODELS})
globals().update({name: _classifier(name) for name in _models_vit.MODELS})
