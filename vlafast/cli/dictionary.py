"""`vlafast dictionary build | search | explain | clusters`: the neuron dictionary (value vectors ->
vocabulary top-k) and keyword clusters written in the steering paper's form."""

from __future__ import annotations

import argparse

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_parser(sub) -> None:
    p = sub.add_parser("dictionary", help="neuron dictionary: build (value vectors -> vocab top-k) | search | explain")
    d = p.add_subparsers(dest="dict_cmd", required=True)
    b = d.add_parser("build", help="project every VLM MLP neuron onto the vocabulary (top-k tokens)")
    b.add_argument("--policy", "--checkpoint", dest="policy", required=True,
                   help="a run folder from `vlafast train`, a LeRobot / openpi pi0 / pi0.5 / pi0-FAST folder, an OpenVLA "
                        "folder")
    b.add_argument("--tokenizer", default=None, help="tokenizer.json or sentencepiece .model (default: the folder's own)")
    b.add_argument("--fast-tokenizer", default=None,
                   help="pi0-FAST: its FAST processor folder (default: the policy folder's fast_tokenizer/)")
    b.add_argument("-o", "--out", required=True, help="output .safetensors file")
    b.add_argument("-k", "--k", type=int, default=10, help="tokens kept per neuron (default 10)")
    b.add_argument("--layers", type=int, nargs="+", default=None, help="VLM layers (default: all)")
    b.add_argument("--bottom-k", action="store_true", help="also keep the k most negative tokens")
    b.add_argument("--final-norm", action="store_true", help="fold the final RMSNorm gain into the projection")
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    b.add_argument("--device", default=None, help="default: cuda when available")
    b.add_argument("--model-id", default=None, help="stored in the metadata (default: the policy path)")
    s = d.add_parser("search", help="neurons whose top-k tokens contain the words")
    s.add_argument("dictionary")
    s.add_argument("words", nargs="+")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--min-hits", type=int, default=1)
    e = d.add_parser("explain", help="one neuron's top (and bottom) tokens")
    e.add_argument("dictionary")
    e.add_argument("layer", help="layer index or name (vlm.3)")
    e.add_argument("neuron", type=int)
    c = d.add_parser("clusters", help="keyword clusters as a cluster file in the paper's form (flat ids, top tokens)")
    c.add_argument("dictionary")
    c.add_argument("names", nargs="+", help="ready keyword sets: fast slow up down care")
    c.add_argument("-o", "--out", required=True, help="output .yaml / .json (name: {flat id: top tokens})")
    c.add_argument("--max-neurons", type=int, default=None, help="keep the strongest N neurons of each (default all)")
    c.add_argument("--min-hits", type=int, default=1)
    c.add_argument("--layers", type=int, nargs="+", default=None, help="VLM layers (default: all in the dictionary)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlafast import policies
    from vlafast.interp import NeuronDictionary

    if args.dict_cmd == "build":
        if args.k < 1:
            raise ValueError(f"-k must be >= 1 (tokens kept per neuron), got {args.k}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        policy = policies.load(args.policy, args.tokenizer, device=device, dtype=dtype, fast_tokenizer=args.fast_tokenizer)
        d = NeuronDictionary.build(policy, policy.tokenizer, k=args.k, layers=args.layers, bottom_k=args.bottom_k,
                                   final_norm=args.final_norm, model_id=args.model_id or str(args.policy),
                                   progress=True)
        d.save(args.out)
        print(f"wrote {args.out}: {len(d.layers)} layers x {d.neurons_per_layer} neurons, top-{d.k} of "
              f"{len(d.tokens)} tokens")
        return 0
    if args.dict_cmd == "search" and (args.limit < 1 or args.min_hits < 1):
        raise ValueError(f"--limit and --min-hits must be >= 1, got {args.limit} and {args.min_hits}")
    if args.dict_cmd == "explain" and args.neuron < 0:
        raise ValueError(f"neuron must be an index >= 0, got {args.neuron}")
    d = NeuronDictionary.load(args.dictionary)
    if args.dict_cmd == "clusters":
        return write_clusters(d, args)
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


def write_clusters(d, args: argparse.Namespace) -> int:
    from vlafast.interp import cluster, write_cluster_file

    if args.min_hits < 1 or (args.max_neurons is not None and args.max_neurons < 1):
        raise ValueError(f"--min-hits and --max-neurons must be >= 1, got {args.min_hits} and {args.max_neurons}")
    layers = args.layers if args.layers is not None else [l for l in d.layers if l.startswith("vlm.")]
    found = {name: cluster(d, name, min_hits=args.min_hits, layers=layers, max_neurons=args.max_neurons)
             for name in args.names}
    empty = [name for name, c in found.items() if not len(c)]
    if empty:
        raise ValueError(f"no neuron of layers {layers} has the words of {', '.join(map(repr, empty))} in its top-{d.k}")
    write_cluster_file(args.out, found, d_ff=d.neurons_per_layer, dictionary=d)
    sizes = ", ".join(f"{name} {len(c)}" for name, c in found.items())
    print(f"wrote {args.out}: {sizes} neurons (flat id = layer x {d.neurons_per_layer} + neuron)")
    return 0
