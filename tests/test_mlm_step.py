"""The MLM step's decoder runs on the masked tokens at positions computed on the host: the loss
transformers' sparse prediction computes, without its boolean mask on the device (a host sync)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from radtrain import models, packing
from radtrain.opcount import OpCounter
from radtrain.tasks import MLMTask

LENGTHS = [150, 7, 33, 64, 2, 90]
SPECIAL = [0, 1, 2, 3, 4]  # pad, cls, sep, unk, mask


def _models() -> tuple[ModernBertForMaskedLM, ModernBertForMaskedLM]:
    config = ModernBertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, sparse_prediction=True,
    )
    torch.manual_seed(0)
    stock = ModernBertForMaskedLM(config)  # transformers' own sparse prediction
    ours = copy.deepcopy(stock)
    models.gather_masked_tokens(ours)
    return ours, stock


def _batch(task: MLMTask, index: list[int] | None = None) -> dict:
    generator = torch.Generator().manual_seed(3)
    width = max(LENGTHS)
    mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.randint(5, 512, (len(LENGTHS), width), generator=generator) * mask
    index = torch.arange(len(LENGTHS)) if index is None else torch.tensor(index)
    return task.prepare({"input_ids": ids, "attention_mask": mask, "index": index}, torch.Generator().manual_seed(1))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_gathered_decoder_computes_transformers_sparse_loss_without_waiting(packed):
    task = MLMTask(mask_token_id=4, vocab_size=512, special_ids=SPECIAL)
    ours, stock = _models()
    batch = _batch(task)
    if packed:
        for model in (ours, stock):
            packing.enable(model, None, "no", "auto")
        batch = packing.pack(batch, token_labels=True, pad_to_multiple_of=8)
    finished = task.finish_batch(batch)
    masked = int((batch["labels"] != -100).sum())
    assert finished["labels"].shape == (masked,) and task.num_items(finished) == masked > 50

    with OpCounter() as counter:
        loss = task.loss_sum(ours, finished)
        loss.backward()
    ref = stock(**packing.model_inputs(batch), labels=batch["labels"], num_items_in_batch=1).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    ref_grads = _grads(stock)
    for name, grad in _grads(ours).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Packed rows (the GPU path): forward and backward wait on nothing. Padded batches keep the two
    # waits of transformers' mask building (`padding_mask.all()`, global and sliding-window masks).
    assert dict(counter.syncs) == ({} if packed else {"_local_scalar_dense": 2})
    with OpCounter() as stock_counter:  # transformers' boolean mask: the same loss, with waits
        stock(**packing.model_inputs(batch), labels=batch["labels"], num_items_in_batch=1).loss.backward()
    assert stock_counter.syncs["index"] >= 2


def test_evaluation_filler_rows_get_no_masked_token_and_the_same_metrics():
    task = MLMTask(mask_token_id=4, vocab_size=512, special_ids=SPECIAL)
    ours, stock = _models()
    batch = _batch(task, index=[0, 1, 2, 3, -1, -1])  # the last two rows pad an evaluation batch
    finished = task.finish_batch(batch)
    real_rows = batch["labels"][:4]
    assert finished["labels"].numel() == int((real_rows != -100).sum())
    assert int(finished[models.MASKED_INDEX_KEY].max()) < 4 * batch["labels"].shape[1]
    sums = task.eval_step(ours.eval(), finished)["sums"]
    labels = torch.where((batch["index"] >= 0)[:, None], batch["labels"], -100)
    logits = stock.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
    target = labels[labels != -100]
    expected = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")
    torch.testing.assert_close(sums[0], expected, rtol=1e-6, atol=0)
    assert sums[2] == target.numel()


def test_a_model_other_than_modernbert_is_refused_with_the_fix():
    """Before: a BERT MLM built fine and failed at its first evaluation with a batch-size mismatch."""
    from transformers import BertConfig, BertForMaskedLM

    from radtrain.config import ConfigError

    bert = BertForMaskedLM(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(ConfigError, match="BertForMaskedLM is not one.*model.name"):
        models.gather_masked_tokens(bert)
