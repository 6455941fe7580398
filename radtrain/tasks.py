"""One task class per objective. The training loop only sees this interface:

- ``prepare(batch, generator)``: turn a collated batch into model inputs (MLM masking lives here);
- ``finish_batch(batch)``: last host-side work on the batch as the model takes it (after packing):
  the MLM decoder's token positions;
- ``num_items(batch)``: how many loss terms the batch contributes (masked tokens, label cells);
- ``loss_sum(model, batch)``: the *summed* loss, so the loop can normalise by the number of items
  in the whole global batch (exact gradient accumulation across micro-batches and ranks);
- ``eval_step`` / ``finish_eval``: per-batch tensors to gather, then metrics from all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from radtrain.metrics import multilabel_metrics
from radtrain.models import MASKED_INDEX_KEY
from radtrain.packing import is_packed, model_inputs

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective mix of 64-bit integers whose
    outputs pass BigCrush as a counter-based generator; wraps modulo 2**64 as intended."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def token_random_bits(base: int, captions: np.ndarray, lengths: np.ndarray, streams: int) -> np.ndarray:
    """(streams, tokens) random 64-bit words for the real tokens of right-padded captions, in row
    order: a pure function of (base, caption index, position, stream), so a caption draws the same
    whatever its batch, rank, padding or row. Counter-based and vectorised: the whole MLM
    ``prepare`` of 512 captions takes 1.5 ms, where a generator per caption took 28.7 ms of host
    time per step (docs/benchmarks.md)."""
    with np.errstate(over="ignore"):
        caption_keys = np.uint64(base) ^ ((captions.astype(np.int64) + 1).astype(np.uint64) * _GOLDEN)
        keys = np.repeat(_splitmix64(caption_keys), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        counters = (np.arange(len(keys)) - starts).astype(np.uint64) * np.uint64(streams)
        return np.stack([_splitmix64(keys ^ _splitmix64(counters + np.uint64(s))) for s in range(streams)])


def _uniform(bits: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from the top 53 bits."""
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class MLMTask:
    """Masked-language modelling (phase 1): ModernBERT's 30% masking, 80/10/10 replacement."""

    mask_token_id: int
    vocab_size: int
    special_ids: list[int]
    mlm_probability: float = 0.3
    name: str = "mlm"
    default_metric: str = "loss"

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        # Masks are drawn on the CPU, per token, from counter-based random bits keyed by (base seed,
        # caption index, position): `generator` (seeded per micro global batch, the same on every
        # rank) gives the base. So a caption's masks do not depend on the device, the number of
        # ranks, which rank holds it, its neighbours, the padding width, or on where a resumed run
        # picked up. Collated batches are right-padded: the real tokens are the mask's True cells.
        real = batch["attention_mask"].bool()
        input_ids = batch["input_ids"].clone()
        ids = input_ids[real].numpy()  # the real tokens, caption by caption
        lengths = real.sum(1).numpy()
        captions = batch["index"].numpy() if "index" in batch else np.arange(len(lengths))
        base = int(torch.randint(2**62, (1,), generator=generator))
        bits = token_random_bits(base, captions, lengths, streams=4)
        masked = (_uniform(bits[0]) < self.mlm_probability) & ~np.isin(ids, self.special_ids)
        replace = masked & (_uniform(bits[1]) < 0.8)  # 80% [MASK]
        randomize = masked & ~replace & (_uniform(bits[2]) < 0.5)  # 10% a random token, 10% unchanged
        targets = np.where(masked, ids, -100)
        ids = np.where(replace, self.mask_token_id, ids)
        ids = np.where(randomize, (bits[3] % np.uint64(self.vocab_size)).astype(np.int64), ids)
        labels = torch.full_like(input_ids, -100)
        labels[real] = torch.from_numpy(targets.astype(np.int64))
        input_ids[real] = torch.from_numpy(ids.astype(np.int64))
        return {**batch, "input_ids": input_ids, "labels": labels}

    def finish_batch(self, batch: dict) -> dict:
        """The masked tokens' flat positions in the batch as the model takes it (padded or packed)
        and their targets, ``labels`` becoming those targets. Run on the host before the copy to
        the device, so the decoder's gather waits on nothing (models.gather_masked_tokens).
        Evaluation's filler rows (index -1) get no masked token."""
        labels = batch["labels"]
        if not is_packed(batch) and "index" in batch:
            labels = torch.where((batch["index"] >= 0)[:, None], labels, -100)
        flat = labels.reshape(-1)
        positions = torch.nonzero(flat != -100).squeeze(1)
        return {**batch, "labels": flat[positions], MASKED_INDEX_KEY: positions}

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())

    def _forward(self, model, batch: dict):
        # num_items_in_batch=1 makes transformers' MLM loss a plain sum over the masked tokens.
        # model_inputs: the padded batch's tensors, or a packed row with caption boundaries.
        inputs = {**model_inputs(batch), MASKED_INDEX_KEY: batch[MASKED_INDEX_KEY]}
        return model(**inputs, labels=batch["labels"], num_items_in_batch=1)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._forward(model, batch).loss

    @torch.no_grad()
    def eval_step(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        target = batch["labels"]
        logits = self._forward(model, batch).logits.float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        return {"sums": torch.stack([loss, correct.float(), torch.tensor(float(target.numel()), device=loss.device)])}

    def finish_eval(self, gathered: dict[str, np.ndarray]) -> dict[str, float]:
        loss_sum, correct, count = gathered["sums"].reshape(-1, 3).sum(0)
        loss = float(loss_sum / max(count, 1))
        return {
            "loss": loss,
            "perplexity": float(math.exp(min(loss, 50.0))),
            "accuracy": float(correct / max(count, 1)),
            "masked_tokens": int(count),
        }


@dataclass
class MultiLabelTask:
    """Multi-label CUI classification (phase 2): BCE with logits, sigmoid at a threshold."""

    num_labels: int
    threshold: float = 0.5
    pos_weight: float | list[float] | None = None
    """One number for every label, or one per label (train.pos_weight=auto); None is plain BCE."""
    loss: str = "bce"
    """'bce' (the series) or 'asl' (asymmetric loss). Evaluation loss is always plain BCE, so
    validation losses compare across loss choices."""
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 1.0
    asl_clip: float = 0.05
    name: str = "classify"
    default_metric: str = "f1"
    _pos_weight_tensor: torch.Tensor | None = field(default=None, init=False, repr=False)

    def prepare(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return batch

    def finish_batch(self, batch: dict) -> dict:
        return batch

    def num_items(self, batch: dict[str, torch.Tensor]) -> int:
        # The seed's BCEWithLogitsLoss averages over every (caption, label) cell.
        return int(batch["labels"].numel())

    def _pos_weight(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.pos_weight is None:
            return None
        if self._pos_weight_tensor is None or self._pos_weight_tensor.device != logits.device:
            weight = torch.as_tensor(self.pos_weight, dtype=torch.float32)
            self._pos_weight_tensor = weight.expand(logits.shape[-1]).clone().to(logits.device)
        return self._pos_weight_tensor

    def _bce_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), pos_weight=self._pos_weight(logits), reduction="sum"
        )

    def _asl_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Asymmetric loss (Ridnik et al., ICCV 2021), summed like _bce_sum.

        Positives: -(1-p)^gamma_pos * log(p). Negatives: -p_m^gamma_neg * log(1-p_m) with the
        shifted probability p_m = max(p - clip, 0), so the many easy negatives of a 900-label
        space stop dominating the gradient. Logs come from logsigmoid (no log(0) in fp32/bf16).
        """
        x, y = logits.float(), labels.float()
        p = torch.sigmoid(x)
        log_p = F.logsigmoid(x)
        if self.asl_clip > 0:
            p_m = (p - self.asl_clip).clamp(min=0)
            log_not_p_m = torch.log((torch.sigmoid(-x) + self.asl_clip).clamp(max=1.0))
        else:
            p_m, log_not_p_m = p, F.logsigmoid(-x)
        positive = (1 - p).pow(self.asl_gamma_pos) * log_p
        negative = p_m.pow(self.asl_gamma_neg) * log_not_p_m
        weight = self._pos_weight(logits)
        if weight is not None:
            positive = positive * weight
        return -(y * positive + (1 - y) * negative).sum()

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # A packed batch gives one logits row per caption too (radtrain.packing pools per caption).
        logits = model(**model_inputs(batch)).logits
        if self.loss == "asl":
            return self._asl_sum(logits, batch["labels"])
        return self._bce_sum(logits, batch["labels"])

    @torch.no_grad()
    def eval_step(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        keep = (batch["index"] >= 0).float()
        loss = (
            F.binary_cross_entropy_with_logits(logits, batch["labels"].float(), reduction="none").mean(-1) * keep
        ).sum()
        # No "labels": evaluate_split takes the targets from the split on the host (by "index").
        return {"index": batch["index"], "probs": torch.sigmoid(logits), "sums": torch.stack([loss, keep.sum()])}

    def finish_eval(self, gathered: dict[str, np.ndarray]) -> dict[str, float]:
        index = gathered["index"]
        keep = index >= 0
        probs = gathered["probs"][keep]
        labels = gathered["labels"][keep]
        loss_sum, count = gathered["sums"].reshape(-1, 2).sum(0)
        metrics = multilabel_metrics(labels, probs >= self.threshold, gathered["labels_outside"][keep])
        metrics["loss"] = float(loss_sum / max(count, 1))
        return metrics

    @staticmethod
    def ordered_outputs(gathered: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(index, probs, labels, labels outside the label space) of real rows, sorted by caption
        index (for threshold tuning, reports)."""
        keep = gathered["index"] >= 0
        order = np.argsort(gathered["index"][keep], kind="stable")
        return tuple(gathered[k][keep][order] for k in ("index", "probs", "labels", "labels_outside"))
