"""pi0-FAST action-chunk latency at batch 1: two camera views + prompt -> a fixed number of
greedy FAST tokens, eager vs CUDA-graphed decode.

On CUDA: the published sizes (SigLIP So400m/14 at 224 px, Gemma-2B, vocabulary 257152) with
random bf16 weights built on the meta device and materialised on the GPU (~6 GB). A FAST chunk
of 10 x 7 LIBERO actions is typically 30-60 tokens; the loop decodes ``--steps`` tokens (random
weights never emit EOS on cue, and a fixed count is what a capturable loop runs anyway).
Backends: ``eager`` (the baseline: prefill + ``steps - 1`` eager decode steps, ``generate``)
and ``graph-decode`` (the same prefill, each decode step one replay of
``vlafast.models.pi0fast.GraphedDecoder``'s graph). A second pair of rows times one decode step
alone against the memory-bandwidth floor (every Gemma weight and the tied vocabulary read once
per token). On a CPU the tiny config runs: ``eager`` against the static-buffer decoder, which
off CUDA runs the very step the graph would replay, eagerly (so the ratio there is the cost of
the static buffers, not a graph's gain).
"""

from __future__ import annotations

import argparse
import logging

import torch

from vlafast.bench.core import Row, decoder_rows, random_decoder, time_ms

log = logging.getLogger(__name__)
# SigLIP's LayerNorm gains scale by w (Gemma's RMSNorm by 1 + w, so its 0 is a unit gain): 1 in
# the random published-size model, or the vision tokens are constant
SIGLIP_GAINS = ("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=48,
                   help="prompt length (task + 8 state bins + separators; default 48)")
    p.add_argument("--steps", type=int, default=48, help="decoded tokens per chunk (default 48)")


def _policy(device: torch.device):
    from vlafast.models.pi0fast import Pi0FASTConfig, Pi0FASTPolicy

    # 1-D tensors 0 but SigLIP's gains; the values do not change the timing, only keep the vision tokens alive
    return random_decoder(Pi0FASTPolicy, Pi0FASTConfig.tiny(), Pi0FASTConfig.pi0fast(), device, ones=SIGLIP_GAINS)


def _decode_bytes(policy) -> int:
    """Bytes one decode step must read: the Gemma layers once, and the tied vocabulary (the
    logits' matmul) once."""
    lm = policy.language_model
    return sum(p.numel() * p.element_size() for p in lm.parameters())


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.models.pi0fast import GraphedDecoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    policy, dtype, config = _policy(device)
    cfg = policy.cfg
    p0 = next(policy.parameters())
    g = torch.Generator(device=device).manual_seed(1)
    s, views, L = cfg.vision.image_size, 2, args.prompt_tokens
    images = (torch.rand(1, views, 3, s, s, device=device, generator=g) * 2 - 1).to(p0.dtype)
    image_masks = torch.ones(1, views, dtype=torch.bool, device=device)
    tokens = torch.randint(2, cfg.vocab_size, (1, L), device=device, generator=g)
    token_masks = torch.ones(1, L, dtype=torch.bool, device=device)
    postfix = torch.randint(2, cfg.vocab_size, (3,), device=device, generator=g)  # "Action: "
    steps = min(args.steps, cfg.max_decoding_steps)
    P = policy.prefix_len(views, L, postfix.numel())
    quick = {} if cuda else {"warmup": 1, "iters": 3}
    shape = f"B=1 V={views} P={P} N={steps}"
    x = (images, image_masks, tokens, token_masks, postfix)

    eager = lambda: policy.generate(*x, max_steps=steps)  # noqa: E731
    decoder = GraphedDecoder(policy, 1, P, steps)
    graphed = lambda: policy.generate(*x, decoder=decoder)  # noqa: E731
    want, got = eager(), graphed()
    extra = {"config": config, "prompt_tokens": L, "graphed": decoder.graph is not None,
             "tokens_match": bool(torch.equal(want.tokens, got.tokens))}
    if not extra["tokens_match"]:  # random bf16 weights can hold near-ties; real weights should not
        log.warning("graphed decode gave tokens %s, eager %s", got.tokens.tolist(), want.tokens.tolist())
    times = {"eager": time_ms(eager, device=device, min_time_s=0.5, max_iters=50, **quick),
             "graph-decode": time_ms(graphed, device=device, min_time_s=0.5, max_iters=50, **quick)}
    st = decoder.state

    def eager_step() -> None:
        st.slot.fill_(P)
        st.position.fill_(P)
        policy.decode_step(st)

    times["step-eager"] = time_ms(eager_step, device=device, min_time_s=0.3, max_iters=200, **quick)
    if decoder.graph is not None:
        def replays() -> None:  # each replay advances slot / step: rewind, then every decode step
            st.slot.fill_(P)
            st.position.fill_(P)
            st.step.fill_(1)
            for _ in range(steps - 1):
                decoder.graph.replay()

        times["step-graph"] = time_ms(replays, device=device, min_time_s=0.3, max_iters=100) / (steps - 1)
        extra["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    return decoder_rows("pi0fast", op="chunk_decode", shape=shape, step_shape=f"B=1 M={st.cache.max_len}", dtype=dtype,
                        times=times, unit="chunks/s", extra=extra, step_bytes=_decode_bytes(policy), config=config,
                        cuda=cuda, graph_backend="graph-decode" if cuda else "static-eager")
