"""`vlafast dictionary build | search | explain` and `vlafast steer`: argument parsing and wiring
over ``NeuronDictionary``, ``cluster``, the plans and ``behaviour`` (``vlafast.cli`` registers
them; nothing here computes anything itself)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_dictionary_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dict_cmd", required=True)
    b = sub.add_parser("build", help="project every VLM MLP neuron onto the vocabulary (top-k tokens)")
    b.add_argument("--checkpoint", required=True,
                   help="a pi0 / pi0.5 checkpoint folder (LeRobot or openpi), an OpenVLA folder, or a vlafast policy.pt")
    b.add_argument("--model", choices=["auto", "pi0", "openvla", "policy"], default="auto",
                   help="checkpoint kind (auto: policy for a .pt file; folders need pi0 or openvla)")
    b.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or sentencepiece .model (default: a policy.pt's own, else "
                        "<checkpoint>/tokenizer.json when present)")
    b.add_argument("-o", "--out", required=True, help="output .safetensors file")
    b.add_argument("-k", "--k", type=int, default=10, help="tokens kept per neuron (default 10)")
    b.add_argument("--layers", type=int, nargs="+", default=None, help="VLM layers (default: all)")
    b.add_argument("--bottom-k", action="store_true", help="also keep the k most negative tokens")
    b.add_argument("--final-norm", action="store_true", help="fold the final RMSNorm gain into the projection")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    b.add_argument("--device", default=None, help="default: cuda when available")
    b.add_argument("--model-id", default=None, help="stored in the metadata (default: the checkpoint path)")
    s = sub.add_parser("search", help="neurons whose top-k tokens contain the words")
    s.add_argument("dictionary")
    s.add_argument("words", nargs="+")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--min-hits", type=int, default=1)
    e = sub.add_parser("explain", help="one neuron's top (and bottom) tokens")
    e.add_argument("dictionary")
    e.add_argument("layer", help="layer index or name (vlm.3)")
    e.add_argument("neuron", type=int)


def _load_model(args: argparse.Namespace):
    """(model, tokenizer or None) for `dictionary build`."""
    import torch

    path = Path(args.checkpoint)
    kind = args.model
    if kind == "auto":
        if path.is_file() and path.suffix == ".pt":
            kind = "policy"
        else:
            raise SystemExit(f"{path}: pass --model pi0 or --model openvla for a checkpoint folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, _DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    if kind == "policy":
        from vlafast.rl.recipe import load_policy

        policy, _, env = load_policy(path)
        env.close()
        return policy.to(device, dtype).eval(), policy.tokenizer
    if kind == "pi0":
        from vlafast.models import load_pi0

        return load_pi0(path, dtype=dtype, device=device).eval(), None
    from vlafast.models import load_openvla

    return load_openvla(path, dtype=dtype, device=device).eval(), None


def main_dictionary(args: argparse.Namespace) -> int:
    from vlafast.interp import NeuronDictionary

    if args.dict_cmd == "build":
        model, own_tok = _load_model(args)
        beside = Path(args.checkpoint) / "tokenizer.json"
        tokenizer = args.tokenizer or own_tok or (str(beside) if beside.is_file() else None)
        if tokenizer is None:
            raise SystemExit("--tokenizer is required (the model's tokenizer.json or sentencepiece .model)")
        d = NeuronDictionary.build(model, tokenizer, k=args.k, layers=args.layers, bottom_k=args.bottom_k,
                                   final_norm=args.final_norm, model_id=args.model_id or str(args.checkpoint),
                                   progress=True)
        d.save(args.out)
        print(f"wrote {args.out}: {len(d.layers)} layers x {d.neurons_per_layer} neurons, top-{d.k} of "
              f"{len(d.tokens)} tokens")
        return 0
    d = NeuronDictionary.load(args.dictionary)
    if args.dict_cmd == "search":
        hits = d.search(args.words, limit=args.limit, min_hits=args.min_hits)
        if not hits:
            print("no neuron has these words among its top-k tokens")
        for h in hits:
            print(f"{h.layer:>10s} {h.neuron:6d}  hits {h.hits}  score {h.score:.2f}  {' '.join(h.tokens)}")
        return 0
    layer = int(args.layer) if args.layer.isdigit() else args.layer
    print(d.explain(layer, args.neuron))
    return 0


def add_steer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="a policy.pt from `vlafast train sft` (default: train the tiny built-in policy now)")
    p.add_argument("--dictionary", default=None, help="a dictionary of this policy (default: build it, k=--k)")
    p.add_argument("--cluster", nargs="+", default=["fast", "slow"],
                   help="ready keyword sets (fast slow up down care) to clamp, one run each")
    p.add_argument("--alpha", type=float, default=4.0, help="clamp value (default 4)")
    p.add_argument("--max-neurons", type=int, default=None, help="keep the strongest N neurons of each cluster (default all)")
    p.add_argument("-k", "--k", type=int, default=3, help="top-k of the dictionary built here (default 3: a ~40-word vocabulary)")
    p.add_argument("--direction", type=float, default=1.0,
                   help="also run the mean-difference direction baseline (quickly - slowly) at +-this alpha; 0: skip")
    p.add_argument("--controls", type=int, default=0,
                   help="random neuron sets of each cluster's size to run as controls (default 0)")
    p.add_argument("--episodes", type=int, default=32, help="episodes per run (a multiple of the env count)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the result as JSON here")


def main_steer(args: argparse.Namespace) -> int:
    from vlafast._io import atomic_write_text
    from vlafast.interp import NeuronDictionary
    from vlafast.interp import behaviour as bh

    if args.checkpoint:
        from vlafast.rl.recipe import load_policy

        policy, _, env = load_policy(args.checkpoint)
        policy.eval()
    else:
        print("no --checkpoint: training the tiny built-in policy (SFT on scripted demos) ...", flush=True)
        policy, env = bh.train_tiny_policy(progress=True)
    d = None
    if args.dictionary:
        d = NeuronDictionary.load(args.dictionary)
        if not d.matches(policy):
            raise SystemExit(f"{args.dictionary} was built from other weights than this policy")
    plans = bh.default_plans(policy, env, dictionary=d, clusters=tuple(args.cluster), alpha=args.alpha, k=args.k,
                             max_neurons=args.max_neurons, direction_alpha=args.direction, controls=args.controls)
    for name in args.cluster:
        if name not in plans:
            print(f"cluster {name!r}: no neuron of layers {bh.action_layers(policy)} has its words in its top-k")
    result = bh.steering_comparison(policy, env, plans, episodes=args.episodes, seed=args.seed)
    env.close()
    print(bh.format_comparison(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
