"""OpenVLA-7B action latency at batch 1: image + prompt -> 7 greedy action tokens, eager vs
CUDA-graphed decode.

On CUDA: the published sizes (DINOv2-L + SigLIP-So400m, Llama-2-7B) with random weights in
bf16, built on the meta device and materialised straight on the GPU (~15 GB). Backends:
``eager`` (the baseline: prefill + 6 eager decode steps) and ``graph-decode`` (the same prefill,
each decode step one CUDA-graph replay; ``vlafast.models.openvla.GraphedDecoder``). A second
pair of rows times one decode step alone against the memory-bandwidth floor (every LLM weight
read once per token). On CPU the tiny config runs eagerly so the module stays importable and
testable; the registry marks this benchmark GPU-only.
"""

from __future__ import annotations

import argparse
import logging

import torch

from vlafast.bench.core import Row, decoder_rows, random_decoder, time_ms

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=24,
                   help="prompt length incl. BOS and the empty token (default 24, a typical instruction)")


def _policy(device: torch.device):
    from vlafast.models.openvla import OpenVLAConfig, OpenVLAPolicy

    # Llama's RMSNorm and the projector's scale factors multiply by w: those start at 1
    return random_decoder(OpenVLAPolicy, OpenVLAConfig.tiny(), OpenVLAConfig.openvla_7b(), device,
                          ones=("norm", "scale_factor"))


def _llm_bytes(policy) -> int:
    """Bytes one decode step must read: every language-model weight except the unused embedding rows."""
    lm = policy.language_model
    total = sum(p.numel() * p.element_size() for p in lm.parameters())
    return total - lm.model.embed_tokens.weight.numel() * lm.model.embed_tokens.weight.element_size()


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.models.openvla import GraphedDecoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    policy, dtype, config = _policy(device)
    cfg = policy.cfg
    p0 = next(policy.parameters())
    g = torch.Generator(device=device).manual_seed(1)
    s = cfg.vision.image_size
    pixel_values = torch.randn(1, 6, s, s, device=device, generator=g).to(p0.dtype)
    ids = torch.randint(2, cfg.tokenizer_vocab, (1, args.prompt_tokens), device=device, generator=g)
    ids[:, 0], ids[:, -1] = 1, 29871  # BOS ... "Out:" + the empty token
    quick = {} if cuda else {"warmup": 1, "iters": 3}
    seq = policy.prefix_len(args.prompt_tokens)
    shape = f"B=1 P={cfg.num_patches} S={seq} A={cfg.action_dim}"

    eager = lambda: policy.predict_action_tokens(pixel_values, ids)  # noqa: E731
    times = {"eager": time_ms(eager, device=device, min_time_s=0.5, max_iters=100, **quick)}
    cache = policy.new_cache(1, args.prompt_tokens)
    with torch.no_grad():
        first = policy.prefill(pixel_values, ids, cache)
        position = torch.tensor([seq], device=device)
        times["prefill"] = time_ms(lambda: policy.prefill(pixel_values, ids, cache), device=device, min_time_s=0.3,
                                   max_iters=100, **quick)
        times["step-eager"] = time_ms(lambda: policy.decode_step(first, position, cache), device=device,
                                      min_time_s=0.3, max_iters=200, **quick)
    extra = {"config": config, "prefill_ms": round(times["prefill"], 4), "prompt_tokens": args.prompt_tokens}
    if cuda:
        decoder = GraphedDecoder(policy, 1, args.prompt_tokens)
        graphed = lambda: policy.predict_action_tokens(pixel_values, ids, decoder=decoder)  # noqa: E731
        want, got = eager(), graphed()
        extra["tokens_match"] = bool(torch.equal(want, got))
        if not extra["tokens_match"]:  # random bf16 weights can hold near-ties; real weights should not
            log.warning("graphed decode gave tokens %s, eager %s", got.tolist(), want.tolist())
        times["graph-decode"] = time_ms(graphed, device=device, min_time_s=0.5, max_iters=100)
        steps = cfg.action_dim - 1

        def replays() -> None:  # each replay advances the position: rewind, then all decode steps
            decoder.position.fill_(seq)
            for _ in range(steps):
                decoder.replay()

        times["step-graph"] = time_ms(replays, device=device, min_time_s=0.3, max_iters=200) / steps
        extra["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    return decoder_rows("openvla", op="action_7tok", shape=shape, step_shape=f"B=1 S={seq}", dtype=dtype, times=times,
                        unit="actions/s", extra=extra, step_bytes=_llm_bytes(policy), config=config, cuda=cuda)
