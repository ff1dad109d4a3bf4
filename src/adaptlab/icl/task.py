"""The ICL task for the shared training loop: online batches drawn from (seed, step), fixed eval sets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptlab.icl.data import _TEST, _TRAIN, _VAL, Batch, ICLWorld, MultimodalWorld, rng_for
from adaptlab.icl.metrics import attention_measures, context_label_agreement
from adaptlab.train import grouped


class ICLTask:
    """``train_batch(step)`` is a fresh batch from the training distribution, a pure function of (seed, step).

    ``evaluate`` reports, on the split's fixed sets: ``ic_acc`` (novel classes: in-context learning), ``ic2_acc``
    (labels shown shifted by one, scored against the shifted label), ``iw_acc`` (non-bursty: in-weights
    learning), ``train_acc``, ``ic_cla``/``iw_cla`` (predictions that are a context label), multimodal
    ``m2only_acc`` (the diagnostic), and the attention measures on the IC set per layer (``ph_l1``, ``ih_l2``…).
    ``acc`` is ``ic_acc`` (the selection metric) and ``loss`` the IC cross-entropy.
    """

    selection_metric = "acc"

    def __init__(self, world: ICLWorld | MultimodalWorld, device: torch.device, seed: int, eval_size: int = 1000,
                 eval_batch_size: int = 1000):
        self.world, self.device, self.seed = world, device, seed
        self.multimodal = isinstance(world, MultimodalWorld)
        self.eval_batch_size = eval_batch_size
        self._sets = {"val": world.eval_sets(_VAL, eval_size), "test": world.eval_sets(_TEST, eval_size)}

    def to_tensors(self, b: Batch) -> dict[str, torch.Tensor]:
        out = {"x": torch.from_numpy(b.tokens).to(self.device), "y": torch.from_numpy(b.target).to(self.device),
               "pos_offset": torch.from_numpy(b.pos_offset).to(self.device)}
        if b.m2 is not None:
            out["m2"] = torch.from_numpy(b.m2).to(self.device)
        return out

    def train_batch(self, step: int, batch_size: int) -> dict[str, torch.Tensor]:
        return self.to_tensors(self.world.sample(rng_for(self.seed, _TRAIN, step), batch_size))

    @staticmethod
    def forward(model, batch: dict) -> torch.Tensor:
        return model(batch["x"], pos_offset=batch["pos_offset"], m2=batch.get("m2"))

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(self.forward(model, batch).float(), batch["y"])

    @staticmethod
    def model_input(batch: dict) -> dict:
        """What a fused pack's grouped forward (``icl.model.icl_forward``) takes: the stacked batch as it is."""
        return batch

    @staticmethod
    def grouped_loss(logits: torch.Tensor, batch: dict, params: dict) -> torch.Tensor:
        """``loss`` of R fused runs from their stacked logits (R, B, L): one value per run."""
        return grouped.cross_entropy(logits, batch["y"])

    @torch.no_grad()
    def _predict(self, model, b: Batch, record: bool):
        logits, maps = [], []
        model.set_record_attn(record)
        try:
            for i in range(0, len(b), self.eval_batch_size):
                sl = slice(i, i + self.eval_batch_size)
                part = Batch(b.tokens[sl], b.target[sl], b.ctx_labels[sl], b.ctx_classes[sl], b.query_class[sl],
                             b.pos_offset[sl], b.bursty[sl], b.novel[sl], None if b.m2 is None else b.m2[sl])
                logits.append(self.forward(model, self.to_tensors(part)).float())
                if record:
                    maps.append(model.attention_maps())
        finally:
            model.set_record_attn(False)
        logits = torch.cat(logits)
        layers = [torch.cat([m[i] for m in maps]) for i in range(len(maps[0]))] if record else []
        return logits, layers

    @torch.no_grad()
    def evaluate(self, model, split: str, autocast=None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        for name, b in self._sets[split].items():
            logits, layers = self._predict(model, b, record=(name == "ic"))
            pred = logits.argmax(-1).cpu().numpy()
            key = "m2only" if name == "ic_m2only" else name
            out[f"{key}_acc"] = float((pred == b.target).mean())
            if name in ("ic", "iw"):
                out[f"{key}_cla"] = context_label_agreement(pred, b.ctx_labels)
            if name == "ic":
                out["loss"] = F.cross_entropy(logits, torch.from_numpy(b.target).to(logits.device)).item()
                for i, attn in enumerate(layers, start=1):
                    for m, v in attention_measures(attn, b.ctx_labels, b.target, self.multimodal).items():
                        out[f"{m}_l{i}"] = v
        out["acc"] = out["ic_acc"]
        model.train(was_training)
        return out
