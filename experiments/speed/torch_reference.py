"""The official recipe's ViT-B/16 and MAE ViT-B/16 steps in PyTorch, timed like benchmark.py.

Written to the official architecture (timm 0.3.2 blocks as models_mae.py / models_vit.py use them: explicit
softmax attention, exact GELU, LayerNorm eps 1e-6, drop path 0.1 when fine-tuning, global pool + fc_norm;
MAE: per-sample random masking by argsort of noise, 8-block 512-d decoder, norm-pix loss), AdamW with the
decay / no-decay groups. Needs torch (not a dependency of this project):

    python experiments/speed/torch_reference.py --job {pretrain,finetune,infer} [--sdpa]

--sdpa uses torch's fused attention, as recent timm does. Prints one JSON line.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads, sdpa):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype)).floor_()
        return x.div(keep) * mask


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path, sdpa):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sdpa)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, sdpa, drop_path=0.1):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 768, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, 768))
        self.blocks = nn.ModuleList([Block(768, 12, drop_path * i / 11, sdpa) for i in range(12)])
        self.fc_norm = nn.LayerNorm(768, eps=1e-6)
        self.head = nn.Linear(768, 1000)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


class MAE(nn.Module):
    def __init__(self, sdpa):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 768, 16, 16)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 768))
        self.pos_embed = nn.Parameter(torch.zeros(1, 197, 768), requires_grad=False)
        self.blocks = nn.ModuleList([Block(768, 12, 0.0, sdpa) for _ in range(12)])
        self.norm = nn.LayerNorm(768, eps=1e-6)
        self.decoder_embed = nn.Linear(768, 512)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 512))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 197, 512), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(512, 16, 0.0, sdpa) for _ in range(8)])
        self.decoder_norm = nn.LayerNorm(512, eps=1e-6)
        self.decoder_pred = nn.Linear(512, 768)

    def forward(self, imgs, mask_ratio=0.75):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        N, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        shuffle = torch.rand(N, L).argsort(1)
        restore = shuffle.argsort(1)
        x = x.gather(1, shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(N, L)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1), x], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(N, L - keep, -1)], 1)
        tokens = tokens.gather(1, restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = imgs.reshape(N, 3, 14, 16, 14, 16).permute(0, 2, 4, 3, 5, 1).reshape(N, L, 768)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum()


def param_groups(model, weight_decay=0.05):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name in ("cls_token", "pos_embed", "mask_token") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def at_least(least):
    def parse(value):
        if not value.isdigit() or int(value) < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value!r}")
        return int(value)
    return parse


def main():
    parser = argparse.ArgumentParser("PyTorch reference timing")
    parser.add_argument("--job", required=True, choices=["pretrain", "finetune", "infer"])
    parser.add_argument("--sdpa", action="store_true")
    parser.add_argument("--batch_size", default=8, type=at_least(1))
    parser.add_argument("--iters", default=3, type=at_least(1))
    parser.add_argument("--warmup", default=1, type=at_least(0))
    parser.add_argument("--threads", default=2, type=at_least(1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 224, 224)
    model = MAE(args.sdpa) if args.job == "pretrain" else ViT(args.sdpa)
    if args.job == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
    else:
        betas = (0.9, 0.95) if args.job == "pretrain" else (0.9, 0.999)
        optimizer = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=betas)
        soft_targets = torch.softmax(torch.randn(args.batch_size, 1000), -1)

        def step():
            for group in optimizer.param_groups:  # the per-iteration lr schedule
                group["lr"] = 1e-4
            if args.job == "pretrain":
                loss = model(x)
            else:
                lam = 0.7  # mixup with the flipped batch
                logits = model(x * lam + x.flip(0) * (1 - lam))
                loss = torch.sum(-soft_targets * F.log_softmax(logits, -1), -1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({"framework": f"torch {torch.__version__}", "job": args.job, "sdpa": args.sdpa,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "img_per_s": round(args.batch_size / median, 3), "s_per_iter_median": round(median, 4)}))


if __name__ == "__main__":
    main()
