"""Can an attention with several captions per tile beat the varlen kernel on ROCO-length captions?

    python tests/gpu/attention_probe.py --data captions.jsonl --batch 512 --json attention.json

Session 3's H100 profile put the varlen flash attention backward at 13.9 ms of a base step at
batch 512 (19% of the GPU's busy time, <1% of its FLOPs): each ~27-token caption gets a kernel
tile of its own (docs/benchmarks.md, "Where the base target's floor is"). FlexAttention over the
whole packed row with a block-diagonal (per-caption) mask puts ~4 captions in a 128-token tile
instead. Whether that is faster once the mask is evaluated per element is what this measures,
before anything is built on it: one attention call (forward + backward) of the base shape on a
packed row of real caption lengths (the scratch BPE radtrain trains, ``--batch`` captions), for

- ``varlen``: PyTorch's varlen flash kernel (what packed training runs now; CUDA, bf16);
- ``blocks``: radtrain's exact fallback (captions scattered into a padded block for SDPA);
- ``flex128`` / ``flex64``: ``flex_attention`` compiled, with ``radtrain.packing.document_block_mask`` at
  128- or 64-token mask blocks (the block structure is built on the device from ``cu_seqlens``
  with no host read-back);

each for the global layers and the local (sliding-window) ones. It prints the milliseconds per
call, the first call's time (the compile), a second batch of another length (does it recompile?),
a call with a freshly built mask of the same length (a new step's mask: compiled again?),
the mask build, the estimated attention time per base step (8 global + 14 local layers, forward
and backward), and the largest difference from the reference output and gradients (``varlen``
on a GPU, ``blocks`` on a CPU). On a CPU it checks the forward only (FlexAttention has no CPU
backward), uncompiled: a correctness dry run, not a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def caption_lengths(data: str, max_length: int = 256) -> list[int]:
    """Token counts of the training captions, with the scratch tokenizer radtrain trains on them."""
    from radtrain.config import load_config
    from radtrain.data.sources import load_splits
    from radtrain.models import train_scratch_tokenizer

    cfg = load_config(None, [f"data.source={data}"])
    texts = load_splits(cfg.data, need_labels=False)["train"].texts
    tokenizer = train_scratch_tokenizer(texts, "base", max_length)
    return [min(len(ids), max_length) for ids in tokenizer(texts)["input_ids"]]


def packed_row(lengths: list[int], batch: int, seed: int, device):
    import torch

    generator = torch.Generator().manual_seed(seed)
    picked = torch.tensor(lengths)[torch.randperm(len(lengths), generator=generator)[:batch]]
    cu = torch.zeros(picked.numel() + 1, dtype=torch.int32)
    torch.cumsum(picked, 0, out=cu[1:])
    return cu.to(device), int(cu[-1]), int(picked.max())


def main(argv: list[str] | None = None) -> int:
    import torch

    from radtrain import packing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=64, help="ModernBERT's local attention: |q - k| <= 64")
    parser.add_argument("--global-layers", type=int, default=8)
    parser.add_argument("--local-layers", type=int, default=14)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="varlen,blocks,flex128,flex64")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from torch.nn.attention.flex_attention import flex_attention

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backward = cuda  # FlexAttention has no backward on a CPU
    lengths = caption_lengths(args.data)
    # 2 mask block sizes x 2 mask functions x (static, then dynamic lengths) graphs: above Dynamo's
    # default limit of 8, past which it would fall back to eager (the dense T x T scores).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    flex = torch.compile(flex_attention) if cuda else flex_attention
    scale = args.head_dim**-0.5

    def run_varlen(q, k, v, cu, longest, window, _mask):
        from torch.nn.attention.varlen import varlen_attn

        size = (-1, -1) if window is None else (window, window)
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, window_size=size)

    def run_blocks(q, k, v, cu, longest, window, _mask):
        # packing's convention: sliding_window is ModernBERT's stored window + 1 (|q - k| <= it - 1)
        return packing._padded_attention(q, k, v, cu, longest, scale, None if window is None else window + 1)

    def run_flex(q, k, v, cu, longest, window, mask):
        def heads_first(x):
            return x.transpose(0, 1).unsqueeze(0)

        return flex(heads_first(q), heads_first(k), heads_first(v), block_mask=mask, scale=scale)[0].transpose(0, 1)

    kernels = {"varlen": (run_varlen, None), "blocks": (run_blocks, None), "flex128": (run_flex, 128),
               "flex64": (run_flex, 64)}
    wanted = [v for v in args.variants.split(",") if v and (v != "varlen" or packing.torch_varlen_kernel())]
    reference = "varlen" if "varlen" in wanted else "blocks"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def mask_for(name, window, cu, total):
        block = kernels[name][1]
        return packing.document_block_mask(cu, total, window, block) if block else None

    def call(name, window, tensors, cu, total, longest, mask):
        fn = kernels[name][0]
        q, k, v, grad = tensors
        out = fn(q, k, v, cu, longest, window, mask)
        if backward:
            out.backward(grad)
        return out

    def tensors_for(total, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (total, args.heads, args.head_dim)
        made = [torch.randn(shape, device=device, dtype=dtype, generator=generator) for _ in range(4)]
        return [x.requires_grad_(backward) for x in made[:3]] + [made[3]]

    batches = [packed_row(lengths, args.batch, seed, device) for seed in (0, 1)]
    cu, total, longest = batches[0]
    print(f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, torch {torch.__version__}, {dtype}, "
          f"{'forward + backward' if backward else 'forward only'}; batch {args.batch}: {total} tokens, "
          f"longest caption {longest}, mean {total / args.batch:.1f}; reference {reference}")
    print("variant  layer   ms/call  first call s  2nd length s  new mask ms  mask ms  max diff out / grad  error",
          flush=True)
    rows, results, failed = [], {}, False
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for window in (None, args.window):
        layer = "global" if window is None else "local"
        for name in sorted(wanted, key=lambda n: n != reference):  # the reference first
            row = {"variant": name, "layer": layer, "error": None}
            try:
                tensors = tensors_for(total, 0)
                t0 = time.perf_counter()
                out = call(name, window, tensors, cu, total, longest, mask_for(name, window, cu, total))
                sync()
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                results[name, layer] = (out.detach().float(), [x.grad.clone() if backward else None for x in tensors[:3]])
                # A training step builds a new mask (a new mask_mod closure) per batch, and most
                # batches have a new length: does either make torch.compile compile again?
                cu2, total2, longest2 = batches[1]
                other = tensors_for(total2, 1)
                t0 = time.perf_counter()
                call(name, window, other, cu2, total2, longest2, mask_for(name, window, cu2, total2))
                sync()
                row["second_length_first_call_s"] = round(time.perf_counter() - t0, 3)
                mask = mask_for(name, window, cu, total)  # built once per step, shared by the layers
                times = []
                for _ in range(args.iters if cuda else 1):
                    for x in tensors[:3]:
                        x.grad = None
                    t0 = time.perf_counter()
                    call(name, window, tensors, cu, total, longest, mask)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
                row["ms_per_call"] = round(statistics.median(times), 3)
                for x in tensors[:3]:
                    x.grad = None
                t0 = time.perf_counter()
                call(name, window, tensors, cu, total, longest, mask_for(name, window, cu, total))
                sync()
                row["new_mask_call_ms"] = round((time.perf_counter() - t0) * 1e3, 3)  # >> ms_per_call: recompiled
                if kernels[name][1]:
                    t0 = time.perf_counter()
                    for _ in range(10):
                        packing.document_block_mask(cu, total, window, kernels[name][1])
                    sync()
                    row["mask_build_ms"] = round((time.perf_counter() - t0) * 100, 3)
                if (reference, layer) in results:
                    (out, grads), (ref_out, ref_grads) = results[name, layer], results[reference, layer]
                    row["max_abs_diff_out"] = float((out - ref_out).abs().max())
                    if backward:
                        row["max_abs_diff_grad"] = max(
                            float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref_grads, strict=True)
                        )
                    if row["max_abs_diff_out"] > tolerance or row.get("max_abs_diff_grad", 0.0) > 5 * tolerance:
                        row["error"] = f"differs from {reference} beyond {tolerance}"
                        failed = True
            except Exception as exc:  # one variant failing (memory, compile) must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print(f"{name:<8} {layer:<6} {row.get('ms_per_call', '-')!s:>8} {row.get('first_call_s', '-')!s:>13}"
                  f" {row.get('second_length_first_call_s', '-')!s:>13} {row.get('new_mask_call_ms', '-')!s:>12}"
                  f" {row.get('mask_build_ms', '-')!s:>8}"
                  f" {row.get('max_abs_diff_out', '-')!s:>10} / {row.get('max_abs_diff_grad', '-')!s:<8}"
                  f" {row['error'] or ''}", flush=True)
            if args.json:  # rewritten after every row: a step killed at its time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                               "batch": args.batch, "tokens": total, "rows": rows}, f, indent=1)

    # The attention of one base step: every layer's forward and backward (8 global, 14 local layers).
    calls = {}
    for row in rows:
        calls.setdefault(row["variant"], {})[row["layer"]] = row.get("ms_per_call")
    for name, per_layer in calls.items():
        if None not in (per_layer.get("global"), per_layer.get("local")):
            step = args.global_layers * per_layer["global"] + args.local_layers * per_layer["local"]
            print(f"{name}: {step:.2f} ms of attention per base step")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
