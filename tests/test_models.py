"""MAE and ViT against the official PyTorch outputs in tests/golden (tolerances from its README)."""
import json
import math

import numpy as np
import paddle
import pytest

import models_mae
import models_vit
from conftest import golden
from helpers import head_before_step, max_abs, tiny_mae, tiny_vit, to_torch_layout
from layer import Attention, DropPath, drop_path_schedule, set_recompute
from util.cpu_layer import attach_cpu_paths
from util.factory import create_model
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed
from util.weights import load_checkpoint, load_model_weights, load_pretrained

TOL = 1e-5


def test_patchify_and_unpatchify(mae_io):
    model = tiny_mae(load=False)
    imgs = paddle.to_tensor(mae_io["imgs"])
    patches = model.patchify(imgs)
    assert max_abs(patches.numpy(), mae_io["patchify"]) == 0.0
    assert max_abs(model.unpatchify(patches).numpy(), mae_io["imgs"]) == 0.0


def test_masking_with_golden_noise(mae_io):
    model = tiny_mae()
    latent, mask, ids_restore = model.forward_encoder(
        paddle.to_tensor(mae_io["imgs"]), float(mae_io["mask_ratio"]), paddle.to_tensor(mae_io["noise"]))
    assert np.array_equal(mask.numpy(), mae_io["mask"])
    assert np.array_equal(ids_restore.numpy(), mae_io["ids_restore"])
    assert max_abs(latent.numpy(), mae_io["latent"]) < TOL
    assert mask.numpy().sum(1).tolist() == [64 - int(64 * 0.25)] * 2


@pytest.mark.parametrize("norm_pix_loss,key", [(True, "loss"), (False, "loss_no_norm_pix")])
def test_pred_and_loss(mae_io, norm_pix_loss, key):
    model = tiny_mae(norm_pix_loss)
    loss, pred, mask = model(paddle.to_tensor(mae_io["imgs"]), float(mae_io["mask_ratio"]),
                             noise=paddle.to_tensor(mae_io["noise"]))
    assert max_abs(pred.numpy(), mae_io["pred"]) < TOL
    assert abs(loss.item() - float(mae_io[key])) < TOL


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_of_every_parameter(mae_io, recompute):
    model = tiny_mae()
    set_recompute(model, recompute)
    loss, _, _ = model(paddle.to_tensor(mae_io["imgs"]), float(mae_io["mask_ratio"]),
                       noise=paddle.to_tensor(mae_io["noise"]))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    assert sorted(n for n, _ in trainable) == sorted(k[5:] for k in mae_io.files if k.startswith("grad/"))
    for name, p in trainable:
        ref = mae_io["grad/" + name]
        assert max_abs(to_torch_layout(name, p.grad.numpy()), ref) <= TOL * np.abs(ref).max(), name


def test_random_masking_draws_noise():
    model = tiny_mae(load=False)
    x = paddle.randn([3, 64, 8])
    kept, mask, ids_restore = model.random_masking(x, 0.75)
    assert kept.shape == [3, 16, 8]
    assert mask.numpy().sum(1).tolist() == [48.0] * 3
    assert not np.array_equal(mask.numpy()[0], mask.numpy()[1]) or not np.array_equal(mask.numpy()[1], mask.numpy()[2])


@pytest.mark.parametrize("global_pool,ckpt,key", [(True, "vit_tiny_gp.pth", "logits_gp"),
                                                   (False, "vit_tiny_cls.pth", "logits_cls")])
def test_vit_logits(vit_io, global_pool, ckpt, key):
    model = tiny_vit(global_pool)
    load_model_weights(model, load_checkpoint(golden(ckpt))["model"], ckpt)
    model.eval()
    assert max_abs(model(paddle.to_tensor(vit_io["imgs"])).numpy(), vit_io[key]) < TOL


@pytest.mark.parametrize("global_pool,ckpt,key,pool", [(True, "vit_tiny_gp.pth", "logits_gp", "avg"),
                                                        (False, "vit_tiny_cls.pth", "logits_cls", "cls")])
def test_vit_forward_features_by_pool(vit_io, global_pool, ckpt, key, pool):
    """The pool a model was trained with, named, gives the official features (the head turns them into the
    golden logits); the other pool of a class-token model is the mean of the patch tokens through its norm."""
    model = tiny_vit(global_pool)
    load_model_weights(model, load_checkpoint(golden(ckpt))["model"], ckpt)
    model.eval()
    imgs = paddle.to_tensor(vit_io["imgs"])
    assert max_abs(model.head(model.forward_features(imgs, pool)).numpy(), vit_io[key]) < TOL
    assert np.array_equal(model.forward_features(imgs, pool).numpy(), model.forward_features(imgs).numpy())


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_mae_forward_features_is_the_encoder_with_every_patch_visible(vit_io, mae_io, pool):
    """MAE's un-masked encoder features equal those of the golden-checked ViT encoder given the same weights
    (mae_tiny.pth in a class-token ViT, which keeps the final norm), and the class token equals that of the
    official masked encoder run with mask ratio 0 (every patch kept, in the noise's order)."""
    mae = tiny_mae()
    vit = tiny_vit(global_pool=False)
    load_model_weights(vit, load_checkpoint(golden("mae_tiny.pth"))["model"], "mae_tiny.pth", allow_missing=(
        "head.weight", "head.bias"), ignore_unexpected=True)
    mae.eval()
    vit.eval()
    imgs = paddle.to_tensor(vit_io["imgs"])
    features = mae.forward_features(imgs, pool).numpy()
    assert features.shape == (2, 64)
    assert max_abs(features, vit.forward_features(imgs, pool).numpy()) < 1e-6
    if pool == "cls":
        latent, _, _ = mae.forward_encoder(imgs, 0.0, paddle.to_tensor(mae_io["noise"]))
        assert max_abs(features, latent.numpy()[:, 0]) < TOL


@pytest.mark.parametrize("key,dim,grid,cls", [("d64_g8_cls", 64, 8, True), ("d768_g14_cls", 768, 14, True),
                                              ("d512_g16", 512, 16, False)])
def test_sincos_tables(key, dim, grid, cls):
    ref = np.load(golden("pos_embed.npz"))[key]
    assert np.array_equal(get_2d_sincos_pos_embed(dim, grid, cls).astype(np.float32), ref)


def test_finetune_start_at_48px(vit_io):
    model = tiny_vit(True, img_size=48)
    missing = load_pretrained(model, golden("mae_tiny.pth"))
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert max_abs(model.pos_embed.numpy(), vit_io["pos_embed48"]) < TOL
    model.eval()
    imgs48 = paddle.to_tensor(vit_io["imgs48"])
    weight, bias = head_before_step(model.forward_features(imgs48).numpy(), vit_io)
    model.head.weight.set_value(np.ascontiguousarray(weight.T))
    model.head.bias.set_value(bias)
    logits = model(imgs48)
    assert max_abs(logits.numpy(), vit_io["logits48"]) < TOL
    loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor(vit_io["labels48"]))
    assert abs(loss.item() - float(vit_io["loss48"])) < TOL


def test_interpolate_keeps_same_size():
    model = tiny_vit(True)
    table = {"pos_embed": np.ones([1, 65, 64], np.float32)}
    interpolate_pos_embed(model, table)
    assert table["pos_embed"].shape == (1, 65, 64)


ARCHS = {"mae_vit_base_patch16": {}, "mae_vit_large_patch16": {}, "mae_vit_huge_patch14": {},
         "vit_base_patch16": {"global_pool": True}, "vit_large_patch16": {"global_pool": True},
         "vit_huge_patch14": {"global_pool": True}, "vit_base_patch16_cls": {"global_pool": False},
         "vit_large_patch16_cls": {"global_pool": False}, "vit_huge_patch14_cls": {"global_pool": False}}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_state_dict_matches_official_manifest(name):
    manifest = json.load(open(golden("arch_manifest.json")))[name]
    with paddle.LazyGuard():  # keys and shapes only; no memory for the weights
        model = create_model(name.replace("_cls", ""), **ARCHS[name])
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(own) == sorted(manifest)
    for k, shape in manifest.items():
        assert to_torch_layout(k, np.empty(own[k], np.int8)).shape == tuple(shape), k


def test_mae_initialisation_matches_official_distribution():
    paddle.seed(0)
    model = models_mae.mae_vit_base_patch16()
    w = model.patch_embed.proj.weight.numpy()
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 768))  # xavier on the [768, 768] view
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 1e-3
    b = model.patch_embed.proj.bias.numpy()
    assert np.abs(b).max() <= 1 / math.sqrt(768) and b.std() > 0.8 / math.sqrt(768) / math.sqrt(3)
    for t in (model.cls_token, model.mask_token):
        assert 0.015 < t.numpy().std() < 0.025
    assert model.pos_embed.stop_gradient and model.decoder_pos_embed.stop_gradient
    assert np.array_equal(model.pos_embed.numpy()[0], get_2d_sincos_pos_embed(768, 14, True).astype(np.float32))
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.numpy().std() - math.sqrt(6.0 / (768 + 2304)) / math.sqrt(3)) < 1e-3
    assert np.all(qkv.bias.numpy() == 0)
    assert np.all(model.norm.weight.numpy() == 1) and np.all(model.norm.bias.numpy() == 0)
    assert model.norm._epsilon == 1e-6
    pred = model.decoder_pred.weight.numpy()
    assert np.abs(pred).max() <= math.sqrt(6.0 / (512 + 768))


def test_vit_init_and_options():
    model = models_vit.vit_tiny_patch4(num_classes=7, drop_path_rate=0.1, global_pool=True)
    assert model.head.weight.shape == [192, 7]
    assert 0.018 < model.head.weight.numpy().std() < 0.022  # timm trunc_normal(.02): cut at +-2, i.e. normal
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert isinstance(model.blocks[0].drop_path, paddle.nn.Identity)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert hasattr(model, "fc_norm") and not hasattr(model, "norm")
    out = models_vit.vit_tiny_patch4(img_size=48, global_pool=False)(paddle.randn([2, 3, 48, 48]))
    assert out.shape == [2, 1000]


def test_factory_overrides():
    m = create_model("mae_vit_tiny_patch4", img_size=16, patch_size=2, in_chans=1, norm_pix_loss=True)
    assert m.norm_pix_loss and m.patch_embed.num_patches == 64
    assert m.decoder_pred.weight.shape == [128, 2 * 2 * 1]
    loss, pred, mask = m(paddle.randn([2, 1, 16, 16]), mask_ratio=0.5)
    assert pred.shape == [2, 64, 4] and mask.shape == [2, 64] and np.isfinite(loss.item())
    assert len(m.blocks) == 12 and m.blocks[0].attn.num_heads == 3 and m.cls_token.shape == [1, 1, 192]


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ValueError, match="mae_vit_base_patch16.*vit_tiny_patch4"):
        create_model("vit_gigantic")


def test_wrong_input_size_is_reported():
    with pytest.raises(ValueError, match="does not match the model"):
        tiny_vit(True)(paddle.randn([1, 3, 48, 48]))


def test_drop_path():
    assert drop_path_schedule(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    layer = DropPath(0.25)
    x = paddle.ones([4000, 2, 3])
    y = layer(x).numpy()
    kept = y[:, 0, 0] > 0
    assert abs(kept.mean() - 0.75) < 0.03
    assert np.allclose(y[kept], 1 / 0.75) and np.all(y[kept][:, :, :] == y[kept][:, :1, :1])
    layer.eval()
    assert np.array_equal(layer(x).numpy(), x.numpy())


def test_attention_paths_agree():
    """Fused attention (the default, flash on GPU), attention written out, and the attached CPU path compute
    the same attention; with an explicit scale as reference."""
    paddle.seed(1)
    attn = Attention(64, num_heads=4)
    x = paddle.randn([2, 17, 64])
    q, k, v = attn.qkv(x).reshape([2, 17, 3, 4, 16]).unbind(2)
    fused = paddle.nn.functional.scaled_dot_product_attention(q, k, v, scale=16 ** -0.5)
    ref = attn.proj(fused.reshape([2, 17, 64])).numpy()
    assert attn.fused_attn and max_abs(attn(x).numpy(), ref) < 1e-6
    attn.fused_attn = False
    assert max_abs(attn(x).numpy(), ref) < 1e-6
    cpu = attach_cpu_paths(Attention(64, num_heads=4))
    cpu.set_state_dict(attn.state_dict())
    assert max_abs(cpu(x).numpy(), ref) < 1e-6


def test_cpu_linear_equals_the_plain_one():
    """The CPU path (addmm; bias gradient through a matrix product) gives F.linear's output and gradients,
    and no gradient for frozen parameters."""
    paddle.seed(0)
    layer = attach_cpu_paths(paddle.nn.Linear(24, 40))
    x = paddle.randn([3, 7, 24])
    x.stop_gradient = False
    dy = paddle.randn([3, 7, 40])
    grads = []
    for forward in (layer, lambda x: paddle.nn.functional.linear(x, layer.weight, layer.bias)):
        y = forward(x)
        (y * dy).sum().backward()
        grads.append([y.numpy(), x.grad.numpy(), layer.weight.grad.numpy(), layer.bias.grad.numpy()])
        for t in (x, layer.weight, layer.bias):
            t.clear_gradient(False)
    assert np.array_equal(grads[0][0], grads[1][0])
    for ours, plain in zip(grads[0][1:], grads[1][1:]):
        assert np.allclose(ours, plain, rtol=1e-5, atol=1e-6)
    assert np.allclose(grads[0][3], dy.numpy().sum((0, 1)), rtol=1e-5, atol=1e-5)
    layer.weight.stop_gradient = layer.bias.stop_gradient = True
    (layer(x) * dy).sum().backward()
    assert layer.weight.grad is None and np.allclose(x.grad.numpy(), grads[1][1], rtol=1e-5, atol=1e-6)
