"""Tokenizers and ModernBERT models: from the Hub, a local directory, or built from scratch.

``scratch:<size>`` builds a ModernBertConfig of that shape and a byte-level BPE tokenizer trained
on the training texts, so every code path runs offline. Hub ids and local directories go through
``from_pretrained`` exactly as users run them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from radtrain.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# name: (hidden, layers, heads, intermediate, tokenizer vocab, config vocab, max positions)
# base/large are the published ModernBERT shapes (vocab 50368); tiny/small are for tests and demos.
SCRATCH_SHAPES = {
    "tiny": (128, 2, 4, 256, 4096, 4096, 1024),
    "small": (256, 4, 4, 512, 8192, 8192, 2048),
    "base": (768, 22, 12, 1152, 32768, 50368, 8192),
    "large": (1024, 28, 16, 2624, 32768, 50368, 8192),
}
SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def train_scratch_tokenizer(texts: list[str], size: str, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE like ModernBERT's own, trained on the given (training) texts only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    vocab_size = SCRATCH_SHAPES[size][4]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_max_length=SCRATCH_SHAPES[size][6],
    )


def scratch_config(size: str, tokenizer) -> ModernBertConfig:
    hidden, layers, heads, intermediate, _, config_vocab, max_pos = SCRATCH_SHAPES[size]
    vocab = max(config_vocab, -(-len(tokenizer) // 64) * 64)
    return ModernBertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_pos,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )


def check_attn_implementation(name: str | None) -> None:
    """model.attn_implementation must be one transformers knows (its registry, eager, a Hub kernel
    'org/name') or radtrain's own: checked at start, not at the model build after the data."""
    if name is None or "/" in name:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from radtrain.packing import ATTN_NAME

    known = sorted({"eager", ATTN_NAME, *ALL_ATTENTION_FUNCTIONS.keys()})
    if name not in known:
        raise ConfigError(
            f"model.attn_implementation={name!r} is not one of {known} (or a Hub kernel 'org/name'); leave it "
            "unset to let radtrain and transformers choose"
        )


def load_tokenizer(source: str, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(
            f"cannot load a tokenizer from {source!r}: {exc}. Offline? Run `radtrain prefetch --model {source}` "
            "where the Hub is reachable, or use model.name=scratch:tiny"
        ) from exc


def max_positions(model_source_config) -> int:
    return int(getattr(model_source_config, "max_position_embeddings", 512))


def check_max_length(max_length: int, config) -> None:
    limit = max_positions(config)
    if max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length} is above the model's limit of {limit} positions; set data.max_length<={limit}"
        )


def _attention(cfg: ModelConfig) -> str | None:
    """model.attn_implementation, registered with transformers first where it is radtrain's own
    (transformers checks the name when it builds the model, before packing.enable would register it)."""
    from radtrain import packing

    if cfg.attn_implementation == packing.ATTN_NAME:
        packing.register()
    return cfg.attn_implementation


def _common_kwargs(cfg: ModelConfig) -> dict:
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if _attention(cfg):
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def weights_source(cfg: ModelConfig) -> str | None:
    """Where pretrained weights come from: init_from, else a Hub id/directory, else None (scratch)."""
    if cfg.init_from:
        return cfg.init_from
    return None if cfg.is_scratch else cfg.name


def build_mlm_model(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    source = weights_source(cfg)
    if source is None:
        torch.manual_seed(seed)
        config = scratch_config(cfg.name.split(":", 1)[1], tokenizer)
        if _attention(cfg):
            config._attn_implementation = cfg.attn_implementation
        model = ModernBertForMaskedLM(config)
    else:
        model = _from_pretrained(AutoModelForMaskedLM, source, cfg)
    # Run the decoder only on masked tokens (ModernBERT's sparse prediction): the vocabulary
    # projection is the largest matmul of the MLM step and ~70% of its positions are unmasked.
    # The export's config says so; radtrain gathers the tokens itself (gather_masked_tokens).
    model.config.sparse_prediction = True
    gather_masked_tokens(model)
    return model


# Flat positions (in the batch as the model takes it) of the tokens the MLM decoder runs on.
MASKED_INDEX_KEY = "radtrain_masked_index"


def _take_masked_index(module, args, kwargs):
    module._radtrain_masked_index = kwargs.pop(MASKED_INDEX_KEY, None)
    return args, kwargs


def _gather_masked(module, args, kwargs, output):
    index = getattr(module, "_radtrain_masked_index", None)
    if index is None:
        return None
    hidden = output.last_hidden_state
    output.last_hidden_state = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    return output


def gather_masked_tokens(model) -> None:
    """Sparse prediction without a host sync: given ``radtrain_masked_index`` (positions computed on
    the host with the masks, ``MLMTask.finish_batch``) the encoder's output is gathered at those
    positions, and the head, decoder and loss run on them with targets of the same length.

    transformers' own sparse prediction selects the tokens with a boolean mask on the device
    (``hidden[labels != -100]``, and the labels, and again in the backward), whose output size
    the host must wait for: three waits per micro-batch, each draining the GPU's queue in the
    middle of the step. Its sparse branch is turned off on the instance (the config keeps
    ``sparse_prediction``); without an index the model decodes every token, correct and slower."""
    encoder = getattr(model, "model", None)
    if type(encoder).__name__ != "ModernBertModel":
        raise ConfigError(
            f"the MLM phase trains ModernBERT models; {type(model).__name__} is not one. Use a ModernBERT "
            "checkpoint (answerdotai/ModernBERT-base or -large, or a scratch:<size> model) for model.name"
        )
    if not getattr(encoder, "_radtrain_gathers", False):
        encoder.register_forward_pre_hook(_take_masked_index, with_kwargs=True)
        encoder.register_forward_hook(_gather_masked, with_kwargs=True)
        encoder._radtrain_gathers = True
    model.sparse_prediction = False


def build_classifier(cfg: ModelConfig, tokenizer, cuis: list[str], seed: int) -> torch.nn.Module:
    id2label = dict(enumerate(cuis))
    label2id = {c: i for i, c in id2label.items()}
    source = weights_source(cfg)
    extra = {}
    if cfg.classifier_pooling:
        extra["classifier_pooling"] = cfg.classifier_pooling
    if cfg.classifier_dropout is not None:
        extra["classifier_dropout"] = cfg.classifier_dropout
    torch.manual_seed(seed)  # the new classification head starts the same on every rank and rerun
    if source is None:
        config = scratch_config(cfg.name.split(":", 1)[1], tokenizer)
        config.num_labels = len(cuis)
        config.id2label, config.label2id = id2label, label2id
        config.problem_type = "multi_label_classification"
        for key, value in extra.items():
            setattr(config, key, value)
        if _attention(cfg):
            config._attn_implementation = cfg.attn_implementation
        return ModernBertForSequenceClassification(config)
    trained_labels = _classifier_labels(cfg)
    model = _from_pretrained(
        AutoModelForSequenceClassification,
        source,
        cfg,
        num_labels=len(cuis),
        id2label=id2label,
        label2id=label2id,
        problem_type="multi_label_classification",
        # An MLM export, or a classifier of another label count: transformers starts a new head.
        ignore_mismatched_sizes=True,
        **extra,
    )
    if trained_labels == cuis:
        log.info("%s: a classifier of the same %d CUIs in the same order; its head is kept", source, len(cuis))
    elif trained_labels is not None and len(trained_labels) == len(cuis):
        # Same shape, other CUIs: transformers would load the head as it is, each row under
        # another CUI. A new head, as for any other label space.
        _new_head(model)
        log.info("%s: a classifier of %d other CUIs (or another order); its head is replaced by a new one",
                 source, len(trained_labels))
    return model


def _classifier_labels(cfg: ModelConfig) -> list[str] | None:
    """The CUIs (in output order) of the sequence classifier the weights come from; None for
    anything else (an MLM export, a base checkpoint)."""
    config = source_config(cfg)
    if not any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return None
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in range(len(id2label))]


def _new_head(model) -> None:
    """Initialise the classification head as transformers initialises a new one. Loaded weights
    are flagged so that transformers' init functions leave them alone; the head's flags are
    cleared first. ModernBERT initialises its classifier from the top module (a scale of its
    own); other architectures per submodule (RoBERTa's and ELECTRA's heads are a dense layer and
    a projection). Under ZeRO-3 the parameters are empty shards: gathered, initialised on rank 0
    and scattered back, so every rank holds the same new head."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"cannot find the classification head of {type(model).__name__} to start it anew")
    params = list(head.parameters())
    gathered = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gathered, torch.no_grad():
        for param in params:
            param._is_hf_initialized = False
        if type(model).__name__ == "ModernBertForSequenceClassification":
            model._init_weights(model)
        else:
            head.apply(model._init_weights)


def _from_pretrained(auto_cls, source: str, cfg: ModelConfig, **kwargs) -> torch.nn.Module:
    try:
        return auto_cls.from_pretrained(source, dtype=torch.float32, **_common_kwargs(cfg), **kwargs)
    except OSError as exc:
        hint = (
            "Run `radtrain prefetch` where the Hub is reachable"
            if not Path(source).exists()
            else "Is it a Hugging Face model directory (config.json + weights)?"
        )
        raise ConfigError(f"cannot load model weights from {source!r}: {exc}. {hint}") from exc


def source_config(cfg: ModelConfig):
    """The model config the run will use, for limits (max positions) before building anything."""
    source = weights_source(cfg)
    if source is None:
        return ModernBertConfig(max_position_embeddings=SCRATCH_SHAPES[cfg.name.split(":", 1)[1]][6])
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise ConfigError(
            f"cannot load the model config from {source!r}: {exc}. Offline? Run `radtrain prefetch --model "
            f"{source}` where the Hub is reachable, or use model.name=scratch:tiny"
        ) from exc


def use_compile_cache(directory: Path) -> str | None:
    """Keep torch.compile's caches (Inductor's FX graphs, AOTAutograd's, Triton's kernels) in
    ``directory``, unless $TORCHINDUCTOR_CACHE_DIR chooses already; returns the folder in use
    (None: torch's own default).

    Inductor's default, /tmp/torchinductor_<user>, is node-local on a cluster: every array task
    and every requeued job landing on a fresh node compiled from cold. Measured on CPU
    (``scratch:small``, layer by layer, tests/gpu/compile_time.py): first step 33.2 s from an
    empty cache, 7.7 s from a filled one (Dynamo still traces; Inductor's codegen is skipped).
    Inductor takes file locks in the folder: on a filesystem without working locks (some Lustre
    or NFS mounts) set $TORCHINDUCTOR_CACHE_DIR to a local disk instead."""
    global _compile_cache_set
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a private module: if a torch release moves it, leave the choice to torch
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Importing torch._dynamo already wrote Inductor's default into the variable: that value, or
    # one set here for an earlier run in this process, is not the user's choice.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    wanted = os.path.abspath(directory)  # how Inductor writes it back
    if current is None or os.path.abspath(current) in (os.path.abspath(default_cache_dir()), _compile_cache_set):
        if current is not None and os.path.abspath(current) != wanted:
            from torch._inductor.utils import clear_caches

            clear_caches()  # some cache paths are memoised per process (as torch's own fresh_cache does)
        _compile_cache_set = wanted
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = wanted
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


_compile_cache_set: str | None = None


COMPILE_BACKEND_ENV = "RADTRAIN_COMPILE_BACKEND"


def allow_recompiles(limit: int = 64) -> None:
    """Raise Dynamo's graphs-per-code-object limit (default 8), past which it silently runs eager:
    radtrain's compiled regions see a bounded but larger set of shapes and layer kinds."""
    from torch._dynamo import config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


def compile_in_place(model: torch.nn.Module, dynamic: bool | None) -> None:
    """torch.compile a model in place (``nn.Module.compile``: state_dict keys, checkpoints and
    exports unchanged).

    A transformer encoder is compiled layer by layer ("regional compilation"): its layers share one
    forward, so Dynamo compiles a graph per distinct layer kind (ModernBERT: the first layer,
    global and local attention) and reuses it for the rest, instead of one graph as deep as the
    model. On an H100 the whole-model graph of the base shape had not finished compiling after
    150 s (docs/benchmarks.md); the head and embeddings stay eager (a few small ops).

    Every layer's compiled entry hangs off one code object (``Module._call_impl``), and Dynamo
    keeps at most ``recompile_limit`` (default 8) graphs per code object before it silently falls
    back to eager: 3 kinds of layer x training / evaluation x static / dynamic shapes would pass
    that, so the limit is raised to fit them.

    ``$RADTRAIN_COMPILE_BACKEND`` (default ``inductor``) picks torch.compile's backend; ``aot_eager``
    runs Dynamo and AOTAutograd without Inductor's code generation: the usual way to tell a Dynamo
    problem from an Inductor one, and what the 2-process ZeRO-3 test uses (Inductor's C++ builds
    took most of its 3-4 minutes on 2 cores; the single-process compile test keeps Inductor)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor").strip() or "inductor"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
        allow_recompiles()
        for layer in layers:
            layer.compile(dynamic=dynamic, backend=backend)
        return
    model.compile(dynamic=dynamic, backend=backend)
