"""The instance-segmentation task of the shared loop: Hungarian-matched training and COCO mask AP (pycocotools)
plus mIoU.

- Loss: Mask2Former-style matching (class prob + mask BCE + dice costs, ``scipy.optimize.linear_sum_assignment``),
  cross-entropy with a down-weighted no-object class, BCE + dice on the matched masks.
- Metrics: COCO AP@[.5:.95] and AP50 of the masks (pycocotools, ground truth built in memory in COCO format) and
  mIoU of the semantic map the instances paint (background included). Score of a prediction =
  max foreground class prob × mean mask probability inside its binary mask (Mask2Former's).

Hand-written, like the head (``adaptlab.peft.dense_head``), because no library offers a ViT + deformable-attention
query head small enough to train on CPU; the matching and the AP come from scipy and pycocotools.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from adaptlab.peft.seg_data import SegDataset
from adaptlab.train.tasks import ImageClassification


# ------------------------------------------------------------------------------------------------ loss


def _dice_bce_costs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise (K, G) mean BCE and dice costs between mask logits (K, P) and targets (G, P)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
    return bce, dice


def set_loss(logits: torch.Tensor, mask_logits: torch.Tensor, gt_masks: torch.Tensor, gt_labels: torch.Tensor, *,
             no_object_weight: float = 0.1, w_class: float = 2.0, w_mask: float = 5.0, w_dice: float = 5.0) -> torch.Tensor:
    """Hungarian-matched set loss. gt_masks (B, G, h, w) float at the mask size, gt_labels (B, G) with -1 padding."""
    B, K, C1 = logits.shape
    weight = torch.ones(C1, device=logits.device)
    weight[-1] = no_object_weight
    target_cls = torch.full((B, K), C1 - 1, dtype=torch.long, device=logits.device)
    pred_m, tgt_m = [], []
    flat = mask_logits.flatten(2).float()
    gflat = gt_masks.flatten(2).float()
    for b in range(B):
        keep = gt_labels[b] >= 0
        if not keep.any():
            continue
        lab, tm = gt_labels[b][keep], gflat[b][keep]
        with torch.no_grad():
            bce, dice = _dice_bce_costs(flat[b], tm)
            cost = -w_class * logits[b].float().softmax(-1)[:, lab] + w_mask * bce + w_dice * dice
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        rows, cols = torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)
        target_cls[b, rows] = lab[cols]
        pred_m.append(flat[b][rows])
        tgt_m.append(tm[cols])
    loss = w_class * F.cross_entropy(logits.float().reshape(B * K, C1), target_cls.flatten(), weight=weight)
    if pred_m:
        pm, tm = torch.cat(pred_m), torch.cat(tgt_m)
        bce = F.binary_cross_entropy_with_logits(pm, tm)
        prob = pm.sigmoid()
        dice = (1 - (2 * (prob * tm).sum(-1) + 1) / (prob.sum(-1) + tm.sum(-1) + 1)).mean()
        loss = loss + w_mask * bce + w_dice * dice
    return loss


# ------------------------------------------------------------------------------------------------ metrics


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_mask_ap(gt_masks: list, gt_labels: list, preds: list, num_classes: int) -> dict[str, float]:
    """COCO mask AP@[.5:.95] and AP50 with pycocotools.

    gt_masks[i] (G, H, W) bool, gt_labels[i] (G,) (entries < 0 ignored); preds[i] a list of (label, score, mask).
    No prediction at all scores 0 (pycocotools cannot load an empty result list).
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (masks, labels) in enumerate(zip(gt_masks, gt_labels)):
        h, w = masks.shape[1:]
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for m, lab in zip(masks, labels):
            if lab < 0 or not m.any():
                continue
            rle = _rle(m)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab) + 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
        for lab, score, m in preds[i]:
            if m.any():
                dets.append({"image_id": i + 1, "category_id": int(lab) + 1, "segmentation": _rle(m),
                             "score": float(score)})
    if not dets or not anns:
        return {"mask_ap": 0.0, "mask_ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mask_ap": max(0.0, float(ev.stats[0])), "mask_ap50": max(0.0, float(ev.stats[1]))}


def semantic_map(masks, labels, num_classes: int, shape) -> np.ndarray:
    """Pixels of each instance get its class; later entries win; background = num_classes."""
    sem = np.full(shape, num_classes, dtype=np.int64)
    for m, lab in zip(masks, labels):
        if lab >= 0:
            sem[m.astype(bool)] = lab
    return sem


def miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes (background included) that occur in ground truth or prediction."""
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    valid = union > 0
    return float((inter[valid] / union[valid]).mean()) if valid.any() else 0.0


def predictions(logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.5):
    """Per image a list of (label, score, bool mask at ``size``), sorted by ascending score."""
    probs = logits.float().softmax(-1)[..., :-1]
    score, label = probs.max(-1)
    m = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
    binary = m > threshold
    mask_score = (m * binary).flatten(2).sum(-1) / (binary.flatten(2).sum(-1) + 1e-6)
    final = (score * mask_score).cpu().numpy()
    label, binary = label.cpu().numpy(), binary.cpu().numpy()
    out = []
    for b in range(len(final)):
        order = np.argsort(final[b], kind="stable")
        out.append([(int(label[b, k]), float(final[b, k]), binary[b, k]) for k in order])
    return out


# ------------------------------------------------------------------------------------------------ task


class InstanceSegmentation(ImageClassification):
    """The segmentation task of the shared loop; batches (and flips) are a pure function of (seed, step), drawn
    exactly as the classification task draws them."""

    selection_metric = "mask_ap"

    def __init__(self, data: SegDataset, img_size: int, device: torch.device, seed: int, *, mean=(0.5,) * 3,
                 std=(0.5,) * 3, eval_batch_size: int = 128, score_threshold: float = 0.5, hflip: bool = False):
        self.data, self.img_size, self.device, self.seed = data, img_size, device, seed
        self.eval_batch_size, self.score_threshold, self.hflip = eval_batch_size, score_threshold, hflip
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        x, m, y = data.split("train")  # only train lives on the device; evaluation streams its split
        self._x = {"train": torch.from_numpy(np.ascontiguousarray(x)).to(device)}
        self._m = torch.from_numpy(np.ascontiguousarray(m)).to(device)
        self._y = {"train": torch.from_numpy(y).to(device)}
        self._perm_epoch, self._perm = -1, None

    def train_batch(self, step: int, batch_size: int):
        idx = self._batch_indices(step, batch_size)
        x, m, y = self._prepare(self._x["train"][idx]), self._m[idx].float(), self._y["train"][idx]
        flip = self._flips(step, len(idx))
        if flip is not None:
            x, m = torch.where(flip, x.flip(-1), x), torch.where(flip, m.flip(-1), m)
        return x, m, y

    def loss(self, model, batch):
        x, m, y = batch
        logits, mask_logits = model(x)
        target = F.interpolate(m, size=mask_logits.shape[-2:], mode="area")
        return set_loss(logits, mask_logits, target, y)

    @torch.no_grad()
    def evaluate(self, model, split: str, autocast=None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        x_all, m_all, y_all = self.data.split(split)
        size = x_all.shape[1:3]
        preds = []
        for i in range(0, len(x_all), self.eval_batch_size):
            x = self._prepare(torch.from_numpy(np.ascontiguousarray(x_all[i:i + self.eval_batch_size])).to(self.device))
            with autocast() if autocast else contextlib.nullcontext():
                logits, mask_logits = model(x)
            preds += predictions(logits, mask_logits, size)
        model.train(was_training)
        C = self.num_classes
        metrics = coco_mask_ap(list(m_all), list(y_all), preds, C)
        conf = np.zeros((C + 1, C + 1), dtype=np.int64)
        for masks, labels, pred in zip(m_all, y_all, preds):
            kept = [(lab, m) for lab, s, m in pred if s >= self.score_threshold]
            p_sem = semantic_map([m for _, m in kept], [lab for lab, _ in kept], C, size)
            g_sem = semantic_map(masks, labels, C, size)
            conf += np.bincount(g_sem.ravel() * (C + 1) + p_sem.ravel(), minlength=(C + 1) ** 2).reshape(C + 1, C + 1)
        metrics["miou"] = miou(conf)
        return metrics
