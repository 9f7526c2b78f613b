"""Optimizer parameter groups: weight decay groups for pre-training, layer-wise lr decay for fine-tuning.

Each group carries 'weight_decay' and, for layer-wise decay, 'learning_rate': the official lr_scale, by which
Paddle multiplies the optimizer's lr.
"""


def param_groups_weight_decay(model, weight_decay=1e-5, skip_list=()):
    """timm add_weight_decay: no decay for 1-D parameters and biases; frozen parameters are left out.

    cls_token and mask_token are 3-D, so they DO decay, as in the official pre-training.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def get_layer_id_for_vit(name, num_layers):
    """cls_token, pos_embed and patch_embed -> 0; blocks.i -> i + 1; everything else -> num_layers."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=0.75):
    """Layer-wise lr decay groups: scale layer_decay ** (num_layers - layer_id), num_layers = depth + 1."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups = {}
    for name, param in model.named_parameters():
        if param.stop_gradient:
            continue
        if param.ndim == 1 or name in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = f"layer_{layer_id}_{g_decay}"
        if group_name not in groups:
            scale = layer_scales[layer_id]  # the official lr_scale
            groups[group_name] = {"learning_rate": scale, "weight_decay": this_decay, "params": []}
        groups[group_name]["params"].append(param)
    return list(groups.values())
