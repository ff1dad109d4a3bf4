"""The dense head's configuration and its image-size check; light (no torch), as the workflow imports it when
it is parsed. The head itself is in ``adaptlab.peft.dense_head``."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DenseHeadConfig:
    dim: int = 64
    n_heads: int = 4
    n_levels: int = 2
    n_points: int = 4
    enc_layers: int = 1
    dec_layers: int = 1
    n_queries: int = 8
    ffn_ratio: float = 2.0
    mask_stride: int = 2  # masks are predicted at image_size / mask_stride
    class_from_mask: bool = True  # a CNN on each query's predicted mask feeds its class logits
    class_mask_size: int = 16  # masks are area-pooled to at most this side for that CNN (its cost grows with it)


def head_config(spec: dict) -> DenseHeadConfig:
    known = set(asdict(DenseHeadConfig()))
    return DenseHeadConfig(**{k: v for k, v in spec.items() if k in known})


def check_mask_size(img_size: tuple[int, int], c: DenseHeadConfig) -> None:
    """The mask CNN halves its input twice: the masks (side ``img_size`` / ``mask_stride`` out of the stem) must
    have a side of at least 4."""
    if not c.class_from_mask:
        return
    side = min((s - 1) // c.mask_stride + 1 for s in img_size)
    if min(side, c.class_mask_size) < 4:
        raise ValueError(f"peft.head: class_from_mask needs masks of side >= 4, but image size {tuple(img_size)} / "
                         f"mask_stride {c.mask_stride} gives {side} (class_mask_size {c.class_mask_size}); lower "
                         "mask_stride or set class_from_mask: false")
