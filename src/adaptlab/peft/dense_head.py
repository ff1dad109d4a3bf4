"""The instance-segmentation model: a timm ViT + a deformable dense head with learned queries.

``DenseHead``: the ViT patch tokens, projected to ``dim``, make level 0; levels 1.. are 2×-average pools.
``enc_layers`` deformable self-attention layers over all levels (queries = every token, reference = its cell
centre), then ``n_queries`` learned queries through ``dec_layers`` decoder layers (self-attention, deformable
cross-attention at learned reference points, FFN). Each query predicts a class (plus "no object") and a mask = its
``mask_embed`` · per-pixel embeddings (level-0 memory, bilinearly upsampled, plus a strided conv stem on the image
at 1 / ``mask_stride`` resolution). With ``class_from_mask`` (the default) a small CNN reads each query's own
predicted mask (detached, resized to at most ``class_mask_size``) and adds its feature to the query before the
class layer. Why: the ViT grid is coarse (4×4 tokens for 32-pixel images), and a query's deformable sampling
points do not depend on the image in a one-layer decoder, so the query alone memorised the training instances'
classes (84 % train vs 31 % validation class accuracy of the best-matching query); the mask's geometry is what
tells the classes apart and generalises (source stage on ``segsrc``, 600 steps, one seed, test mask AP: 0.09
without it at mask stride 2, 0.15 without it at stride 1, 0.42 with it at stride 1). The CNN belongs to the dense
head: it trains in the source stage and in full/partial, and stays frozen in the PEFT arms like the rest of the
dense head. Post-norm layers as in Deformable DETR; FFN layers are named ``linear1``/``linear2`` so that LoRA's
``fc1``/``fc2`` target only the ViT MLPs. The configuration (``DenseHeadConfig``) is in ``adaptlab.peft.head_config``.

Hand-written because no library offers a ViT + deformable-attention query head small enough to train on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.peft.deformable import MSDeformAttn
from adaptlab.peft.head_config import DenseHeadConfig, check_mask_size


class _FFN(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.linear1 = nn.Linear(dim, int(dim * ratio))
        self.linear2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))


class DeformEncoderLayer(nn.Module):
    def __init__(self, c: DenseHeadConfig):
        super().__init__()
        self.self_attn = MSDeformAttn(c.dim, c.n_levels, c.n_heads, c.n_points)
        self.norm1, self.norm2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.ffn = _FFN(c.dim, c.ffn_ratio)

    def forward(self, src, ref, shapes):
        src = self.norm1(src + self.self_attn(src, ref, src, shapes))
        return self.norm2(src + self.ffn(src))


class DeformDecoderLayer(nn.Module):
    def __init__(self, c: DenseHeadConfig):
        from timm.models.vision_transformer import Attention

        super().__init__()
        self.self_attn = Attention(c.dim, num_heads=c.n_heads, qkv_bias=True)
        self.cross_attn = MSDeformAttn(c.dim, c.n_levels, c.n_heads, c.n_points)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.ffn = _FFN(c.dim, c.ffn_ratio)

    def forward(self, tgt, qpos, ref, memory, shapes):
        tgt = self.norm1(tgt + self.self_attn(tgt + qpos))
        tgt = self.norm2(tgt + self.cross_attn(tgt + qpos, ref, memory, shapes))
        return self.norm3(tgt + self.ffn(tgt))


def _cell_centres(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                            indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)  # (h·w, 2) as (x, y)


class DenseHead(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, c: DenseHeadConfig):
        super().__init__()
        self.cfg, self.num_classes = c, num_classes
        self.input_proj = nn.Linear(in_dim, c.dim)
        self.level_embed = nn.Parameter(torch.zeros(c.n_levels, c.dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.encoder = nn.ModuleList(DeformEncoderLayer(c) for _ in range(c.enc_layers))
        self.decoder = nn.ModuleList(DeformDecoderLayer(c) for _ in range(c.dec_layers))
        self.query_feat = nn.Embedding(c.n_queries, c.dim)
        self.query_pos = nn.Embedding(c.n_queries, c.dim)
        self.ref_point = nn.Linear(c.dim, 2)
        self.pixel_proj = nn.Linear(c.dim, c.dim)
        # a high-resolution skip from the pixels (Mask2Former's pixel decoder has one from the CNN's stride-4
        # features): ViT tokens alone give masks at patch resolution, too coarse for objects a few patches wide
        self.pixel_stem = nn.Sequential(nn.Conv2d(3, c.dim, 3, stride=c.mask_stride, padding=1), nn.GELU(),
                                        nn.Conv2d(c.dim, c.dim, 1))
        if c.class_from_mask:
            self.mask_class_net = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                nn.Linear(32, c.dim))
        # the task heads: these train in every arm
        self.class_embed = nn.Linear(c.dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, c.dim))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], image: torch.Tensor):
        B, _, _ = tokens.shape
        h, w = grid
        c = self.cfg
        x = self.input_proj(tokens)
        feat0 = x.transpose(1, 2).reshape(B, c.dim, h, w)
        levels = [feat0] + [F.avg_pool2d(feat0, 2 ** lvl, ceil_mode=True) for lvl in range(1, c.n_levels)]
        shapes = [(f.shape[2], f.shape[3]) for f in levels]
        src = torch.cat([f.flatten(2).transpose(1, 2) + self.level_embed[i] for i, f in enumerate(levels)], 1)
        ref = torch.cat([_cell_centres(hh, ww, x.device) for hh, ww in shapes])
        ref = ref[None, :, None, :].repeat(B, 1, c.n_levels, 1).to(x.dtype)
        for layer in self.encoder:
            src = layer(src, ref, shapes)
        # contiguous copies, not expand(): matmul picks its kernel for a stride-0 input by whether the weight
        # requires grad, so a frozen layer would round differently from a trainable one
        tgt = self.query_feat.weight[None].repeat(B, 1, 1)
        qpos = self.query_pos.weight[None].repeat(B, 1, 1)
        qref = self.ref_point(self.query_pos.weight).sigmoid()[None, :, None, :].repeat(B, 1, c.n_levels, 1)
        for layer in self.decoder:
            tgt = layer(tgt, qpos, qref, src, shapes)
        pixel = self.pixel_proj(src[:, :h * w]).transpose(1, 2).reshape(B, c.dim, h, w)
        stem = self.pixel_stem(image)
        pixel = F.interpolate(pixel, size=stem.shape[-2:], mode="bilinear", align_corners=False) + stem
        masks = torch.einsum("bkd,bdhw->bkhw", self.mask_embed(tgt), pixel)
        if c.class_from_mask:
            # detached: the class loss should not bend the masks towards shapes that are easy to classify
            soft = masks.detach().sigmoid().flatten(0, 1)[:, None]
            size = tuple(min(s, c.class_mask_size) for s in soft.shape[-2:])
            if size != tuple(soft.shape[-2:]):
                soft = F.adaptive_avg_pool2d(soft, size)
            tgt = tgt + self.mask_class_net(soft).view(B, masks.shape[1], -1)
        return self.class_embed(tgt), masks


class InstanceSegmenter(nn.Module):
    """A timm ViT (``backbone``, headless) + ``DenseHead`` (``head``) → (class logits (B, K, C+1), mask logits)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_cfg: DenseHeadConfig):
        super().__init__()
        check_mask_size(tuple(backbone.patch_embed.img_size), head_cfg)
        self.backbone = backbone
        self.head = DenseHead(backbone.embed_dim, num_classes, head_cfg)

    def forward(self, x: torch.Tensor):
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
        return self.head(tokens, tuple(self.backbone.patch_embed.grid_size), x)
