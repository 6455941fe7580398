"""radtrain's forward for ModernBERT attention on packed rows: transformers' maths, fewer kernels."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForSequenceClassification
from transformers.models.modernbert import modeling_modernbert

from radtrain import packing
from radtrain.data.batching import packed_length, resolve_pad_multiple
from radtrain.opcount import OpCounter

LENGTHS = [150, 7, 33, 64, 2, 90]  # one caption longer than the local window (128), one of 2 tokens


def _model(seed: int = 0) -> ModernBertForSequenceClassification:
    config = ModernBertConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=512, num_labels=11, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2,
    )
    torch.manual_seed(seed)
    return ModernBertForSequenceClassification(config)


def _packed_batch(pad_to_multiple_of: int = 1) -> dict:
    generator = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.randint(1, 512, (len(LENGTHS), width), generator=generator)
    mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    labels = (torch.rand(len(LENGTHS), 11, generator=generator) < 0.3).float()
    return packing.pack(
        {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}, token_labels=False,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def _step(model, batch, dtype):
    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(**packing.model_inputs(batch)).logits
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="sum")
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize(
    "dtype, rotary_dtype",
    # bf16 q/k with fp32 cos/sin: autocast; with bf16 cos/sin: bf16 weights (DeepSpeed's bf16).
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_rotary_qk_is_transformers_rotary_bitwise(dtype, rotary_dtype):
    config = _model().config
    rotary = modeling_modernbert.ModernBertRotaryEmbedding(config)
    total, heads, dim = sum(LENGTHS), 4, 16
    qkv = torch.randn(total, 3 * heads * dim).to(dtype).view(total, 3, heads, dim)
    positions = _packed_batch()["position_ids"]
    assert positions.shape == (1, total)
    for layer_type in ("full_attention", "sliding_attention"):
        cos, sin = rotary(torch.zeros(1, dtype=rotary_dtype), positions, layer_type)  # in the hidden states' dtype
        assert cos.dtype == rotary_dtype
        # transformers' layout: (batch, heads, tokens, head_dim) views of Wqkv's output.
        q, k = (qkv[:, i].transpose(0, 1).unsqueeze(0) for i in (0, 1))
        want_q, want_k = modeling_modernbert.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        got = packing.rotary_qk(qkv, cos[0], sin[0])
        assert got.dtype == dtype and got.is_contiguous()
        assert got[0].is_contiguous() and got[1].is_contiguous()  # what the varlen kernel reads, no copy
        assert torch.equal(got[0], want_q[0].transpose(0, 1)), layer_type
        assert torch.equal(got[1], want_k[0].transpose(0, 1)), layer_type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_matches_transformers_forward_with_fewer_ops(dtype):
    batch = _packed_batch()
    ours, stock = _model(), _model()
    for model in (ours, stock):
        packing.enable(model, None, "bf16" if dtype == torch.bfloat16 else "no", "auto")
    assert packing.use_stock_attention_forward(stock) == 4
    attention = [m for m in ours.modules() if type(m).__name__ == "ModernBertAttention"]
    assert len(attention) == 4 and all(getattr(type(m), "_radtrain_packed", False) for m in attention)
    assert not any(getattr(type(m), "_radtrain_packed", False) for m in stock.modules())

    results = {}
    for name, model in (("ours", ours), ("stock", stock)):
        with OpCounter() as counter:
            logits, grads = _step(model, batch, dtype)
        results[name] = (logits, grads, counter.total)
    (logits, grads, ops), (ref_logits, ref_grads, ref_ops) = results["ours"], results["stock"]
    assert logits.shape == (len(LENGTHS), 11)
    # The same operations on the same values: bitwise equal, forward and backward.
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    # Forward + backward of 4 layers. Measured: 358 vs 414 operators in fp32, 440 vs 528 in bf16
    # (no fp32 copies of queries and keys to make and cast back); on a GPU the varlen kernel's
    # input copies of queries and keys go too.
    saved_per_layer = 12 if dtype == torch.float32 else 20
    assert ops <= ref_ops - 4 * saved_per_layer, (ops, ref_ops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_forward_matches_transformers_forward_with_fewer_launches():
    """On a GPU, in bf16 autocast, both forwards run PyTorch's varlen flash kernel: the forward is
    bitwise the same; gradients agree to the kernel's run-to-run noise (its backward may
    accumulate in parallel); radtrain's launches fewer kernels (no fp32 copies of queries and
    keys, no layout copies of them)."""
    if not packing.torch_varlen_kernel():
        pytest.skip("no varlen kernel in this torch (needs >= 2.10)")
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _packed_batch().items()}
    ours, stock = _model().cuda(), _model().cuda()
    for model in (ours, stock):
        packing.enable(model, None, "bf16", "auto")
    assert packing.use_stock_attention_forward(stock) == 4
    results = {}
    for name, model in (("ours", ours), ("stock", stock)):
        _step(model, batch, torch.bfloat16)  # warm-up: kernel selection, allocator
        with OpCounter("cuda") as counter:
            logits, grads = _step(model, batch, torch.bfloat16)
        results[name] = (logits, grads, counter.total)
    (logits, grads, ops), (ref_logits, ref_grads, ref_ops) = results["ours"], results["stock"]
    assert torch.equal(logits, ref_logits)
    for name, grad in ref_grads.items():
        error = float((grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12))
        assert error < 1e-2, (name, error)
    assert ops <= ref_ops - 4 * 20, (ops, ref_ops)


def test_packing_refuses_a_model_with_attention_dropout(monkeypatch):
    """radtrain's packed attention applies no dropout: packing a model whose config asks for it
    would silently train another model."""
    from radtrain.config import ConfigError

    model = _model()
    model.config.attention_dropout = 0.1
    with pytest.raises(ConfigError, match="attention_dropout=0.1"):
        packing.enable(model, None, "no", "auto")
    # packing=auto on a GPU with a varlen kernel (this CPU has none: the probe says it has) pads it.
    monkeypatch.setattr(packing, "torch_varlen_kernel", lambda: True)
    assert not packing.resolve("auto", model, torch.device("cuda"), "bf16", None)
    assert packing.resolve("auto", _model(), torch.device("cuda"), "bf16", None)  # without dropout: packs


def test_packed_lengths_are_bounded():
    """Packed rows take a bounded set of lengths (new lengths are new matrix-product shapes):
    multiples of pad_to_multiple_of, at most 64 per doubling, filler under max(multiple, T/64)."""
    tokens = range(1, 70_000)
    lengths = [packed_length(t, 8) for t in tokens]
    assert all(n >= t and n % 8 == 0 and n - t < max(8, t / 64) for t, n in zip(tokens, lengths, strict=True))
    for k in range(10, 17):  # rows of 513 .. 65,536 tokens, a doubling at a time
        assert len({packed_length(t, 8) for t in range(2 ** (k - 1) + 1, 2**k + 1)}) <= 64
    assert len(set(lengths)) < 700  # against 69,999 exact lengths
    assert [packed_length(t, 1) for t in (1, 257, 14_001)] == [1, 257, 14_001]  # exact packing stays exact
    assert packed_length(5, 12) == 12 and packed_length(9000, 12) % 12 == 0
    # The default (null) bounds shapes where per-shape work is reused (a GPU), not on a CPU.
    assert [resolve_pad_multiple(None, "cuda"), resolve_pad_multiple(None, "cpu"), resolve_pad_multiple(32, "cpu")] == [8, 1, 32]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_filler_changes_no_caption(pooling):
    """Filler after the captions (its own segments, none longer than the longest caption) leaves
    every caption's logits and the gradients as they are; the model gives one row per caption."""
    exact, padded = _packed_batch(), _packed_batch(pad_to_multiple_of=512)
    real = sum(LENGTHS)
    assert padded["input_ids"].shape == (1, 512) and exact["input_ids"].shape == (1, real)
    assert torch.equal(padded["input_ids"][0, :real], exact["input_ids"][0]) and (padded["input_ids"][0, real:] == 0).all()
    # 166 filler tokens in segments of at most 150 (the longest caption): attention width unchanged.
    assert padded["cu_seqlens"].tolist() == [*exact["cu_seqlens"].tolist(), real + 150, 512]
    assert padded["max_seqlen"] == exact["max_seqlen"] == 150
    assert padded["position_ids"][0, real:].tolist() == [*range(150), *range(16)]
    results = []
    for batch in (exact, padded):
        model = _model()
        model.config.classifier_pooling = pooling
        packing.enable(model, None, "no", "auto")
        results.append(_step(model, batch, torch.float32))
    (logits, grads), (ref_logits, ref_grads) = results[1], results[0]
    assert logits.shape == (len(LENGTHS), 11)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_filler_takes_no_mlm_label():
    batch = _packed_batch()
    generator = torch.Generator().manual_seed(2)
    width = max(LENGTHS)
    mask = (torch.arange(width)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    labels = torch.where(torch.rand(len(LENGTHS), width, generator=generator) < 0.3, 5, -100) * mask - 100 * (1 - mask)
    packed = packing.pack(
        {"input_ids": torch.ones_like(mask) * mask, "attention_mask": mask, "labels": labels}, token_labels=True,
        pad_id=3, pad_to_multiple_of=8,
    )
    real = sum(LENGTHS)
    assert packed["input_ids"].shape == packed["labels"].shape == (1, packed_length(real, 8)) and real % 8
    assert (packed["labels"][0, real:] == -100).all() and (packed["input_ids"][0, real:] == 3).all()
    assert torch.equal(packed["labels"][0, :real], labels[mask.bool()])
    assert batch["cu_seqlens"].numel() == len(LENGTHS) + 1  # pack() without a multiple: exact


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on a CPU, on purpose
@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("window", [None, 64])
def test_flex_document_mask_is_per_caption_attention(block, window):
    """The block-diagonal FlexAttention mask of data.packed_attention=flex: its element mask computes
    exactly radtrain's per-caption attention (forward only: FlexAttention has no CPU backward, and
    eager FlexAttention evaluates the element mask densely), and its block lists, which only the
    GPU kernel reads, name every block holding an allowed pair (exactly those without a window).
    Captions longer than a mask block and than ModernBERT's local window exercise both."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = torch.tensor([3, 200, 17, 90, 1, 64, 129, 40, 5, 77])
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    total = int(cu[-1])
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, 2, 16, generator=generator) for _ in range(3))
    expected = packing._padded_attention(q, k, v, cu, int(lengths.max()), 0.25, None if window is None else window + 1)
    mask = packing.document_block_mask(cu, total, window, block)

    def heads_first(x):
        return x.transpose(0, 1).unsqueeze(0)

    with torch.no_grad():
        out = flex_attention(heads_first(q), heads_first(k), heads_first(v), block_mask=mask, scale=0.25)
    torch.testing.assert_close(out[0].transpose(0, 1), expected, rtol=1e-5, atol=1e-5)

    listed = mask.to_dense()[0, 0].bool()  # (query blocks, key blocks) the kernel would visit
    needed = create_block_mask(mask.mask_mod, None, None, total, total, device="cpu", BLOCK_SIZE=block)
    needed = needed.to_dense()[0, 0].bool()
    assert not (needed & ~listed).any(), "a block with an allowed (query, key) pair is not listed"
    if window is None:
        assert torch.equal(listed, needed)


def _attention_masks_seen(model) -> list:
    """The attention_mask each attention module is called with (a BlockMask per layer type for flex)."""
    seen = []
    for module in model.modules():
        if type(module).__name__ == "ModernBertAttention":
            module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    return seen


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on a CPU, on purpose
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_flex_packed_forward_matches_block_attention(pooling):
    """data.packed_attention=flex computes what the exact block attention computes, global and local
    layers alike (a 150-token caption is longer than the local window of 128), filler included.
    Forward only: PyTorch has no FlexAttention backward on a CPU (the GPU check is below)."""
    from torch.nn.attention.flex_attention import BlockMask

    batch = _packed_batch(pad_to_multiple_of=8)
    logits = {}
    for attention in ("flex", "blocks"):
        model = _model()
        model.config.classifier_pooling = pooling
        packing.enable(model, None, "no", attention)
        seen = _attention_masks_seen(model)
        with torch.no_grad():
            logits[attention] = model(**packing.model_inputs(batch)).logits
        if attention == "flex":  # one mask per layer type, built once per batch and shared by the layers
            assert len(seen) == 4 and all(isinstance(m, BlockMask) for m in seen)
            assert seen[0] is seen[3] and seen[1] is seen[2] and seen[0] is not seen[1]  # global, local, local, global
        else:
            assert seen == [None] * 4
    assert logits["flex"].shape == (len(LENGTHS), 11)
    torch.testing.assert_close(logits["flex"], logits["blocks"], rtol=1e-5, atol=1e-5)


def test_flex_masks_pass_into_layers_compiled_with_dynamic_lengths(monkeypatch):
    """train.compile with flex: Dynamo takes the BlockMasks (and their mask functions' captured
    tensors) as inputs of the compiled layers, and rows of two lengths compute what the block
    attention computes. aot_eager on a CPU (forward only): torch 2.13's Inductor CPU template for
    FlexAttention does not build with dynamic shapes, and a CPU cannot train flex anyway; a GPU
    compiles it with Triton (tests/gpu/bench_gpu.sh, step flex)."""
    from radtrain import models

    monkeypatch.setenv(models.COMPILE_BACKEND_ENV, "aot_eager")
    flex, blocks = _model(), _model()
    packing.enable(flex, None, "no", "flex")
    packing.enable(blocks, None, "no", "blocks")
    models.compile_in_place(flex, dynamic=True)
    for multiple in (8, 64):  # two row lengths: 352 and 384 tokens
        batch = _packed_batch(pad_to_multiple_of=multiple)
        with torch.no_grad():
            got, want = (m(**packing.model_inputs(batch)).logits for m in (flex, blocks))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_is_refused_where_it_cannot_train():
    from radtrain.config import ConfigError

    with pytest.raises(ConfigError, match="packed_attention=flex trains on CUDA only"):
        packing.enable(_model(), None, "no", "flex", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot use model.attn_implementation=flash_attention_2"):
        packing.enable(_model(), "flash_attention_2", "bf16", "flex")


def test_a_chosen_packed_attention_that_a_padded_run_ignores_is_named(caplog):
    """data.packed_attention=flex with data.packing=auto on a CPU trains padded batches: the
    choice was dropped without a word (docs said flex on a CPU is refused)."""
    config = _model().config
    with caplog.at_level(logging.WARNING, logger="radtrain.packing"):
        packing.check_before_start("auto", "flex", None, torch.device("cpu"), "no", config)
        packing.check_before_start("off", "blocks", None, torch.device("cpu"), "no", config)
        packing.check_before_start("auto", "auto", None, torch.device("cpu"), "no", config)
        packing.check_before_start("auto", "blocks", None, torch.device("cpu"), "no", config, warn=False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    # Flex cannot train here at all: packing is not offered as the way to use it.
    assert "data.packed_attention=flex has no effect" in warnings[0] and "on a GPU only; this run is on cpu" in warnings[0]
    assert "data.packing=on would not help: data.packed_attention=flex trains on CUDA only" in warnings[0]
    assert "(data.packing=off). data.packing=on packs with it" in warnings[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flex_step_matches_block_attention():
    """On a GPU, in bf16 autocast, a packed step with FlexAttention (compiled, per-caption block
    masks) gives the block attention's logits and gradients to bf16 accuracy."""
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _packed_batch(8).items()}
    results = {}
    for attention in ("flex", "blocks"):
        model = _model().cuda()
        packing.enable(model, None, "bf16", attention, device=torch.device("cuda"))
        results[attention] = _step(model, batch, torch.bfloat16)
    (logits, grads), (ref_logits, ref_grads) = results["flex"], results["blocks"]
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
    for name, grad in ref_grads.items():
        error = float((grads[name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12))
        assert error < 2e-2, (name, error)
