"""Padding-free (packed) training batches for ModernBERT.

transformers 5's ModernBERT no longer unpads: a padded batch spends its embeddings, projections
and MLPs on padding. A packed micro-batch is the same captions concatenated into one row of T real
tokens (and a little filler that bounds the row's length, ``pack``), with per-caption positions and
boundaries (``cu_seqlens``), so only the attention needs to know where captions start:

- CUDA with flash-attn installed: ``attn_implementation="flash_attention_2"``; transformers takes
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` and calls flash-attn's varlen kernel.
- CUDA without flash-attn (many clusters): the ``radtrain_varlen`` attention below calls
  PyTorch's own varlen flash kernel (``torch.nn.attention.varlen``), same windows as ModernBERT.
- ``data.packed_attention=blocks``, and on the CPU (tests; ``data.packing=on``): the same
  function scatters each caption into a padded (captions x longest) block for SDPA and gathers the
  real rows back. Exact; attention then costs what a padded batch costs (little, with length
  buckets), while the projections and MLPs still skip padding. On an H100 the varlen kernel's
  backward took 19% of a base step's GPU time for ROCO-length captions (docs/benchmarks.md),
  which is why this path is offered on CUDA too.
- ``data.packed_attention=flex`` (CUDA): PyTorch's FlexAttention over the whole row with a
  per-caption block mask (``document_block_mask``), so one kernel tile holds several short
  captions where the varlen kernel gives each caption a tile of its own. The encoder's pre-hook
  builds one mask for the global layers and one for the local ones per batch and hands them to
  the layers as transformers' per-layer-type ``attention_mask``. Not measured on a GPU yet
  (docs/benchmarks.md); PyTorch has no FlexAttention backward on a CPU, so it trains on CUDA only.

With ``radtrain_varlen`` the attention modules also get a forward of radtrain's for packed rows
(``PackedModernBertAttention``): the rotary embedding of queries and keys in one pass, bitwise
what transformers computes, laid out as the varlen kernel reads them. transformers' forward
launches 16 kernels for the rotary per layer (bf16) and copies queries and keys for the varlen
kernel; the step is launch-bound on a GPU (docs/benchmarks.md), and kernels are what it waits on.

``radtrain_varlen`` is plain SDPA for padded batches (evaluation always pads), so a model set to
it computes exactly what the default ``sdpa`` model computes. The attention choice is a runtime
setting, not saved in exports.

The stock classifier pools the CLS token of row 0, which in a packed batch is only the first
caption; a forward hook on the encoder pools per caption instead (CLS of each caption, or the
caption mean), giving the head one row per caption. Labels stay (captions x labels): nothing like
``DataCollatorWithFlattening`` touches the multi-hot targets. For MLM the labels are packed with
the tokens and the decoder still runs only on masked positions (sparse prediction).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from radtrain.config import ConfigError
from radtrain.data.batching import packed_length

log = logging.getLogger(__name__)

ATTN_NAME = "radtrain_varlen"
PACKED_KEY = "cu_seqlens"
# How many of a packed row's segments are captions; the rest are filler (batching.packed_length).
CAPTIONS_KEY = "radtrain_captions"
# data.packed_attention, set on each attention module by enable(): the attention reads it there.
ATTENTION_ATTR = "_radtrain_packed_attention"
# FlexAttention's mask granularity: 128 is its default block, which every kernel config supports.
FLEX_BLOCK = 128
# ModernBertModel skips building masks when given one per layer type; packed attention needs none.
_NO_MASKS = {"full_attention": None, "sliding_attention": None}


@functools.cache
def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a build that does not match this torch/CUDA
        return False
    return True


@functools.cache
def flash_capable_gpu() -> bool:
    """A CUDA GPU that flash attention kernels run on: Ampere (sm80) or newer. Both PyTorch's
    varlen kernel and flash-attn 2 refuse a V100 or T4 at their first call."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@functools.cache
def torch_varlen_kernel() -> bool:
    """PyTorch's own varlen flash attention runs here (CUDA sm80+, torch >= 2.10)."""
    if not flash_capable_gpu():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_usable() -> bool:
    return flash_attn_installed() and flash_capable_gpu()


# -- the attention function ------------------------------------------------------------------------


def _padded_attention(query, key, value, cu_seqlens, max_len, scaling, sliding_window):
    """Exact varlen attention on any device: scatter the captions of a packed row (T, H, D) into
    a (captions, H, max_len, D) block, SDPA with a key-padding (and local-window) mask, gather the
    real rows back (T, H, D)."""
    total, heads, dim = query.shape
    n = cu_seqlens.numel() - 1
    lengths = cu_seqlens.diff().long()
    segment = torch.repeat_interleave(torch.arange(n, device=query.device), lengths, output_size=total)
    position = torch.arange(total, device=query.device) - cu_seqlens.long()[segment]
    flat = segment * max_len + position

    def to_block(x):
        block = x.new_zeros(n * max_len, heads, dim)
        block.index_copy_(0, flat, x)
        return block.view(n, max_len, heads, dim).transpose(1, 2)

    keys = torch.arange(max_len, device=query.device)
    mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # (n, 1, 1, max_len)
    # Applied whatever the batch's longest caption (a no-op when all are shorter than the window):
    # a test on max_len would make torch.compile guard on it and compile a second graph.
    if sliding_window is not None:
        # transformers' bidirectional window for sdpa: |q - k| <= config.sliding_window, and
        # ModernBertAttention stores config.sliding_window + 1 for flash's inclusive bounds.
        near = (keys[:, None] - keys[None, :]).abs() <= sliding_window - 1
        mask = mask & near[None, None]
    out = F.scaled_dot_product_attention(to_block(query), to_block(key), to_block(value), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).reshape(n * max_len, heads, dim)[flat]


def packed_attention(module, query, key, value, cu_seqlens, max_len: int, scaling, sliding_window):
    """Attention within each caption of a packed row: query/key/value (T, heads, head_dim) -> (T, heads, head_dim).
    PyTorch's varlen flash kernel where it runs (and the module is not set to blocks), else the
    exact block fallback."""
    kernel = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and torch_varlen_kernel()
    if kernel and getattr(module, ATTENTION_ATTR, "auto") != "blocks":
        from torch.nn.attention.varlen import varlen_attn

        window = (-1, -1)
        if sliding_window is not None:  # unconditionally, as above (compile guards)
            window = (sliding_window - 1, sliding_window - 1)  # as transformers passes flash-attn
        # .contiguous() copies only the values: rotary_qk already lays queries and keys out so.
        return varlen_attn(
            query.contiguous(), key.contiguous(), value.contiguous(), cu_seqlens, cu_seqlens, max_len, max_len,
            scale=scaling, window_size=window,
        )
    return _padded_attention(query, key, value, cu_seqlens, max_len, scaling, sliding_window)


def document_block_mask(cu_seqlens: torch.Tensor, total: int, window: int | None = None, block: int = FLEX_BLOCK):
    """FlexAttention ``BlockMask`` for a packed row of ``total`` tokens: token q attends to token k
    iff both lie in the same segment of ``cu_seqlens`` (and ``|q - k| <= window`` for a local layer).

    Built from ``cu_seqlens`` with tensor operations only (no read-back to the host, so the GPU
    never waits for it): each ``block`` of queries spans segments ``doc[start]..doc[end]``; its
    keys are the blocks covering those segments' tokens (narrowed by the window), listed in order.
    Every listed block is "partial" (the mask is evaluated per element): captions much shorter
    than a block rarely fill one."""
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    cu = cu_seqlens.long()
    blocks = -(-total // block)
    doc = torch.searchsorted(cu[1:], torch.arange(total, device=device), right=True)
    starts = torch.arange(blocks, device=device) * block
    ends = torch.clamp(starts + block, max=total) - 1
    first, last = cu[doc[starts]], cu[doc[ends] + 1] - 1  # the keys these queries may see
    if window is not None:
        first, last = torch.maximum(first, starts - window), torch.minimum(last, ends + window)
    first_block, last_block = first // block, last // block
    count = (last_block - first_block + 1).int()
    indices = torch.clamp(first_block[:, None] + torch.arange(blocks, device=device), max=blocks - 1).int()

    if window is None:
        def same_caption(b, h, q, k):
            return doc[q] == doc[k]
    else:
        def same_caption(b, h, q, k):
            return (doc[q] == doc[k]) & ((q - k).abs() <= window)

    return BlockMask.from_kv_blocks(
        count[None, None], indices[None, None], BLOCK_SIZE=block, mask_mod=same_caption, seq_lengths=(total, total)
    )


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: uncompiled, it evaluates the mask densely (the
    whole T x T score matrix). Packed rows take a bounded set of lengths (``packed_length``), each
    a graph until Dynamo makes the length dynamic; the recompile limit is raised to fit them."""
    from torch.nn.attention.flex_attention import flex_attention

    from radtrain.models import allow_recompiles

    allow_recompiles()
    return torch.compile(flex_attention)


def flex_packed_attention(query, key, value, block_mask, scaling) -> torch.Tensor:
    """FlexAttention over a packed row: query/key/value (T, heads, head_dim) -> (T, heads, head_dim).
    Inside a compiled region (``train.compile``) flex_attention is traced with the layer; in eager
    mode on CUDA it runs through its own compiled wrapper. On a CPU (forward only: tests) it runs
    eagerly, evaluating the mask densely."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = _compiled_flex() if query.is_cuda and not torch.compiler.is_compiling() else flex_attention

    def heads_first(x):
        return x.transpose(0, 1).unsqueeze(0)  # (1, heads, T, head_dim), a view

    out = flex(heads_first(query), heads_first(key), heads_first(value), block_mask=block_mask, scale=scaling)
    return out[0].transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """transformers attention interface: query/key/value (batch, heads, tokens, head_dim).

    Padded batches (evaluation, inference) get exactly the sdpa path. Packed rows normally arrive
    through the packed attention forward below instead; this route serves a ModernBERT whose
    attention module could not be given that forward."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = [x[0].transpose(0, 1) for x in (query, key, value)]  # (T, heads, head_dim)
    out = packed_attention(module, *rows, cu_seqlens, int(kwargs["max_length_q"]), scaling, sliding_window)
    return out.unsqueeze(0), None  # (1, T, H, D), the layout transformers' attention functions return


# -- the attention module's forward for packed rows ------------------------------------------------


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of a packed row's queries and keys, both at once.

    ``qkv`` (T, 3, heads, head_dim) is Wqkv's output viewed per head; ``cos``/``sin`` (T, head_dim).
    Returns (2, T, heads, head_dim) in qkv's dtype, contiguous, so queries and keys are each the
    contiguous (T, heads, head_dim) rows the varlen kernel takes (transformers' layout needed
    three copies for it).

    Bitwise what transformers' ``apply_rotary_pos_emb`` computes (the rotation in fp32, rounded
    once), in 5 operators on the (T, hidden) tensors (roll, two products, sum, cast) and 2-3 on
    the small (T, head_dim) sine where transformers' takes 16 in bf16: ``rotate_half(x) * sin ==
    roll(x, D/2) * sin'`` with the first half of ``sin'`` negated (negation is exact); a bf16
    tensor times an fp32 one is computed in fp32 inside the kernel, so nothing is upcast on its
    own; queries and keys go through together. cos and sin are taken to fp32 first: transformers
    hands them over in the weights' dtype (bf16 under DeepSpeed's bf16), and upcasts q and k.
    """
    half = qkv.shape[-1] // 2
    x = qkv[:, :2].transpose(0, 1)  # (2, T, heads, head_dim), a view
    signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).float()[:, None, :]
    rotated = torch.roll(x, half, dims=-1) * signed_sin  # roll allocates contiguous (2, T, H, D)
    # The contiguous operand first: the sum takes its layout, not x's (T, 2, H, D) strides.
    return (rotated + x * cos.float()[:, None, :]).to(qkv.dtype)


@functools.cache
def _packed_attention_class(base: type) -> type:
    """``base`` (ModernBertAttention) with a forward that computes packed rows itself: rotary on
    queries and keys at once, laid out for the varlen kernel. Padded batches take base's forward.
    A subclass rather than a per-instance forward: torch.compile then sees one module type for
    every layer and reuses one graph across them."""

    class PackedModernBertAttention(base):
        _radtrain_packed = True

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            cu_seqlens = kwargs.get("cu_seq_lens_q")
            if cu_seqlens is None:
                return super().forward(
                    hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
                )
            total = hidden_states.shape[1]  # one packed row: (1, T, hidden)
            qkv = self.Wqkv(hidden_states).view(total, 3, -1, self.head_dim)
            cos, sin = position_embeddings  # (1, T, head_dim) each
            query, key = rotary_qk(qkv, cos[0], sin[0])
            if attention_mask is not None:  # data.packed_attention=flex: this layer type's BlockMask
                out = flex_packed_attention(query, key, qkv[:, 2], attention_mask, self.head_dim**-0.5)
            else:
                out = packed_attention(
                    self, query, key, qkv[:, 2], cu_seqlens, int(kwargs["max_length_q"]), self.head_dim**-0.5,
                    self.sliding_window,
                )
            return self.out_drop(self.Wo(out.reshape(1, total, -1))), None

    PackedModernBertAttention.__name__ = PackedModernBertAttention.__qualname__ = base.__name__
    return PackedModernBertAttention


_ATTENTION_PARTS = ("Wqkv", "Wo", "out_drop", "head_dim", "sliding_window")


def _give_packed_forward(module) -> bool:
    """Swap a ModernBertAttention module to the packed subclass; False (stock forward kept, still
    exact through ``varlen_attention``) if this transformers version's module lacks a part it uses."""
    if getattr(type(module), "_radtrain_packed", False):
        return True
    if not all(hasattr(module, part) for part in _ATTENTION_PARTS):
        return False
    module.__class__ = _packed_attention_class(type(module))
    return True


@functools.cache
def register() -> None:
    """Make ``radtrain_varlen`` a valid attn_implementation (masks for padded batches as sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, varlen_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# -- hooks on the model ----------------------------------------------------------------------------


def _encoder(model):
    inner = getattr(model, "model", None)
    return inner if inner is not None and type(inner).__name__ == "ModernBertModel" else None


def _packed_inputs(module, args, kwargs):
    """Before the encoder's forward: no masks for packed rows (or, for ``flex``, one BlockMask per
    layer type, built once per batch and shared by the layers), and the caption count (not an
    argument transformers knows) kept on the module for the pooling hook."""
    module._radtrain_captions = kwargs.pop(CAPTIONS_KEY, None)
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None:
        if getattr(module, ATTENTION_ATTR, "auto") == "flex":
            total = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]
            window = module.config.sliding_window  # ModernBERT's local layers: |q - k| <= sliding_window
            kwargs["attention_mask"] = {
                "full_attention": document_block_mask(cu_seqlens, total),
                "sliding_attention": document_block_mask(cu_seqlens, total, window),
            }
        else:
            kwargs["attention_mask"] = dict(_NO_MASKS)
    return args, kwargs


def _pool_per_caption(pooling: str):
    def hook(module, args, kwargs, output):
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:
            return None
        # Segments after the captions are filler (pack); without a count, every segment is a caption.
        captions = getattr(module, "_radtrain_captions", None)
        starts = cu_seqlens[:-1] if captions is None else cu_seqlens[:captions]
        hidden = output.last_hidden_state[0]  # (T, hidden)
        if pooling == "mean":
            lengths = cu_seqlens.diff().long()
            segment = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=hidden.device), lengths, output_size=hidden.shape[0]
            )
            sums = hidden.new_zeros(lengths.numel(), hidden.shape[-1]).index_add_(0, segment, hidden)
            pooled = (sums / lengths[:, None].to(hidden.dtype))[: starts.numel()]
        else:  # 'cls': each caption's first token
            pooled = hidden[starts.long()]
        # (captions, 1, hidden): the classifier's own pooling of position 0 (or the mean over a
        # length-1 axis) is then the identity.
        output.last_hidden_state = pooled.unsqueeze(1)
        return output

    return hook


def use_stock_attention_forward(model) -> int:
    """Give a packed model's attention modules back transformers' own forward (packed rows then go
    through ``varlen_attention``: exact, more kernels). For measuring what radtrain's forward
    saves (tests, tests/gpu/packed_forward.py); returns how many modules changed."""
    changed = 0
    for module in model.modules():
        if getattr(type(module), "_radtrain_packed", False):
            module.__class__ = type(module).__bases__[0]
            changed += 1
    return changed


def _attention_dropout(config) -> float:
    return float(getattr(config, "attention_dropout", 0.0) or 0.0)


def check_before_start(
    setting: str, attention: str, attn_implementation: str | None, device: torch.device, mixed_precision: str,
    model_config, warn: bool = True,
) -> None:
    """What ``resolve`` and ``enable`` would decide and refuse for this model's config on this
    device, checked before the run reads data, trains a tokenizer or writes anything. ``warn``
    (the main process): say when a chosen ``data.packed_attention`` goes unused."""
    modernbert = getattr(model_config, "model_type", None) == "modernbert"
    dropout = _attention_dropout(model_config)
    what = f"a {getattr(model_config, 'model_type', None) or type(model_config).__name__} model"
    padded = _padded_reason(setting, modernbert, device, mixed_precision, attn_implementation, dropout)
    if padded is None:
        _packed_attention_name(modernbert, what, attn_implementation, mixed_precision, attention, device, dropout)
    elif attention != "auto" and warn:
        # Chosen on purpose and otherwise unused without a word: say so, and whether packing could use it.
        try:
            _packed_attention_name(modernbert, what, attn_implementation, mixed_precision, attention, device, dropout)
            fix = "data.packing=on packs with it"
        except ConfigError as exc:
            fix = f"data.packing=on would not help: {exc}"
        log.warning(
            "data.packed_attention=%s has no effect: this run trains padded batches (%s). %s",
            attention, padded, fix,
        )


def _check_flex(device: torch.device | None) -> None:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"data.packed_attention=flex needs PyTorch's FlexAttention (torch >= 2.5; this is {torch.__version__}); "
            "use data.packed_attention=auto"
        ) from exc
    if device is not None and device.type != "cuda":
        raise ConfigError(
            f"data.packed_attention=flex trains on CUDA only (PyTorch has no FlexAttention backward on {device.type}); "
            "use data.packed_attention=auto or blocks"
        )


def _packed_attention_name(
    modernbert: bool, what: str, attn_implementation: str | None, mixed_precision: str, attention: str,
    device: torch.device | None, dropout: float,
) -> str:
    """The attn_implementation a packed model runs, or the ConfigError that refuses the settings.
    On settings alone, so that ``check_before_start`` refuses at start what ``enable`` would."""
    if not modernbert:
        raise ConfigError(f"data.packing=on needs a ModernBERT model; {what} is not one. Use data.packing=off")
    if attn_implementation not in (None, "flash_attention_2", ATTN_NAME):
        raise ConfigError(
            f"data.packing=on cannot run with model.attn_implementation={attn_implementation!r} (it would let "
            "packed captions attend to each other); unset it, use flash_attention_2, or data.packing=off"
        )
    if attention in ("blocks", "flex") and attn_implementation == "flash_attention_2":
        raise ConfigError(
            f"data.packed_attention={attention} runs radtrain's own attention; it cannot use "
            "model.attn_implementation=flash_attention_2 (unset it, or use data.packed_attention=varlen)"
        )
    if attention == "flex":
        _check_flex(device)
    half = mixed_precision in ("bf16", "fp16")
    if attention == "varlen" and not (half and (flash_attn_usable() or torch_varlen_kernel())):
        raise ConfigError(
            "data.packed_attention=varlen needs a varlen flash kernel: an Ampere or newer GPU, train.precision bf16, "
            "and flash-attn or torch >= 2.10; none is here. Use data.packed_attention=auto (or blocks)"
        )
    name = attn_implementation
    if name is None:
        flash = half and flash_attn_usable() and attention in ("auto", "varlen")
        name = "flash_attention_2" if flash else ATTN_NAME
    if name == ATTN_NAME and dropout:
        raise ConfigError(
            f"data.packing=on: this model's config sets attention_dropout={dropout}, which radtrain's "
            "packed attention does not apply (flash-attn's does); use data.packing=off, flash-attn, or a config with "
            "attention_dropout=0"
        )
    return name


def supports_packing(model) -> bool:
    return _encoder(model) is not None


def enable(
    model, attn_implementation: str | None, mixed_precision: str = "no", attention: str = "auto",
    device: torch.device | None = None,
) -> str:
    """Install the packing hooks and the attention that reads ``cu_seq_lens``; returns its name.

    ``attn_implementation`` is the user's model.attn_implementation (None: choose: flash-attn
    where installed and the step runs in half precision, which its kernels need); ``attention``
    is data.packed_attention (validated with the config); ``device`` is where the model trains
    (the trainer gives it: ``flex`` has no backward on a CPU; None for forward-only use)."""
    encoder = _encoder(model)
    name = _packed_attention_name(
        encoder is not None, type(model).__name__, attn_implementation, mixed_precision, attention, device,
        _attention_dropout(model.config),
    )
    if name == ATTN_NAME:
        register()
    flagged = stock = 0
    setattr(encoder, ATTENTION_ATTR, attention)  # its pre-hook builds flex's masks
    for module in encoder.modules():  # the attention function reads the choice from its module
        if type(module).__name__ == "ModernBertAttention":
            setattr(module, ATTENTION_ATTR, attention)
            if name == ATTN_NAME and not _give_packed_forward(module):
                stock += 1
            flagged += 1
    if stock and attention == "flex":  # transformers' forward would hand the BlockMask to SDPA
        raise ConfigError(
            f"data.packed_attention=flex: {stock} ModernBertAttention modules of this transformers version lack a "
            f"part of {_ATTENTION_PARTS} that radtrain's packed forward uses; use data.packed_attention=auto"
        )
    if stock:
        log.warning("%d ModernBertAttention modules lack a part of %s: they pack with transformers' own "
                    "forward (exact, more kernels per step)", stock, _ATTENTION_PARTS)
    if attention in ("blocks", "flex") and flagged == 0:  # a renamed class would silently run the varlen kernel
        raise ConfigError(f"data.packed_attention={attention}: no ModernBertAttention module in {type(model).__name__}")
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)
    if not getattr(encoder, "_radtrain_packing", False):
        encoder.register_forward_pre_hook(_packed_inputs, with_kwargs=True)
        if hasattr(model, "classifier"):
            pooling = getattr(model.config, "classifier_pooling", "cls")
            encoder.register_forward_hook(_pool_per_caption(pooling), with_kwargs=True)
        encoder._radtrain_packing = True
    return name


def resolve(setting: str, model, device: torch.device, mixed_precision: str, attn_implementation: str | None) -> bool:
    """Whether to pack: 'on'/'off' as given; 'auto' where a varlen kernel makes it pay (CUDA in
    bf16 with flash-attn or PyTorch's varlen attention) and the model is a ModernBERT."""
    return _packs(setting, supports_packing(model), device, mixed_precision, attn_implementation, _attention_dropout(model.config))


def _packs(
    setting: str, modernbert: bool, device: torch.device, mixed_precision: str, attn_implementation: str | None,
    dropout: float,
) -> bool:
    return _padded_reason(setting, modernbert, device, mixed_precision, attn_implementation, dropout) is None


def _padded_reason(
    setting: str, modernbert: bool, device: torch.device, mixed_precision: str, attn_implementation: str | None,
    dropout: float,
) -> str | None:
    """Why this run trains padded batches, or None where it packs."""
    if setting == "off":
        return "data.packing=off"
    if setting == "on":
        return None
    auto = "data.packing=auto packs"
    if not modernbert:
        return f"{auto} ModernBERT models only"
    if device.type != "cuda":
        return f"{auto} on a GPU only; this run is on {device.type}"
    if mixed_precision not in ("bf16", "fp16"):
        return f"{auto} in bf16/fp16 only; this run is in {mixed_precision}"
    if dropout and attn_implementation != "flash_attention_2":
        # radtrain's packed attention applies no dropout (flash-attn's does); padded batches do
        return f"{auto} a config with attention_dropout={dropout} only with flash_attention_2"
    if attn_implementation not in (None, "flash_attention_2", ATTN_NAME):
        return f"{auto} not with model.attn_implementation={attn_implementation!r}"
    if not (flash_attn_usable() or torch_varlen_kernel()):
        return f"{auto} only where a varlen kernel runs (flash-attn, or torch >= 2.10 on an Ampere or newer GPU)"
    return None


# -- batches ---------------------------------------------------------------------------------------


def pack(batch: dict[str, torch.Tensor], token_labels: bool, pad_id: int = 0, pad_to_multiple_of: int = 1) -> dict:
    """A padded batch (after task.prepare, so MLM masks are the padded batch's) -> one packed row.

    Keeps ``index`` and per-caption labels (classifier) as they are; ``token_labels`` (MLM) are
    packed with the tokens. The row is ``batching.packed_length`` long: filler tokens (``pad_id``,
    MLM label -100) after the captions, in segments of their own no longer than the longest
    caption, so they attend only to filler, leave ``max_seqlen`` (and the block width of
    ``blocks`` attention) unchanged, and are dropped by the classifier's per-caption pooling."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    captions = lengths.numel()
    real = int(lengths.sum())
    longest = int(lengths.max()) if captions else 0
    filler = packed_length(real, pad_to_multiple_of) - real
    chunk = max(longest, 1)
    filler_segments = [chunk] * (filler // chunk) + ([filler % chunk] if filler % chunk else [])
    segments = torch.cat([lengths, torch.tensor(filler_segments, dtype=lengths.dtype)])
    cu_seqlens = torch.zeros(segments.numel() + 1, dtype=torch.int32)
    torch.cumsum(segments, 0, out=cu_seqlens[1:])
    total = real + filler
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), segments, output_size=total)
    packed = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    ids = batch["input_ids"][mask]
    packed["input_ids"] = torch.cat([ids, ids.new_full((filler,), pad_id)]).unsqueeze(0)
    packed["position_ids"] = (torch.arange(total) - starts).unsqueeze(0)
    packed[PACKED_KEY] = cu_seqlens
    packed["max_seqlen"] = max([longest, *filler_segments])
    packed[CAPTIONS_KEY] = captions
    labels = batch.get("labels")
    if labels is not None:
        if token_labels:
            targets = labels[mask]
            packed["labels"] = torch.cat([targets, targets.new_full((filler,), -100)]).unsqueeze(0)
        else:
            packed["labels"] = labels
    return packed


def is_packed(batch: dict) -> bool:
    return PACKED_KEY in batch


def model_inputs(batch: dict) -> dict:
    """Keyword arguments for the model's forward, packed or padded."""
    if not is_packed(batch):
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cu, longest = batch[PACKED_KEY], batch["max_seqlen"]
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }
    if CAPTIONS_KEY in batch:  # taken off by the encoder's pre-hook (_packed_inputs) before its forward
        inputs[CAPTIONS_KEY] = batch[CAPTIONS_KEY]
    return inputs
