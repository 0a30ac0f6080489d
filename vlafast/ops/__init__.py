"""Fused ops: one op per file (Triton kernel(s), a validating launcher, ``<op>_ref`` in torch).

Each op dispatches through ``vlafast._backend.resolve`` to the kernel on CUDA, to the same
kernel in Triton's interpreter under ``TRITON_INTERPRET=1``, else to its torch reference.
"""

from vlafast.ops.steer import add_direction_, add_direction_ref, steer_correction_, steer_correction_ref
from vlafast.ops.vocab_topk import MAX_K, vocab_topk, vocab_topk_chunked, vocab_topk_ref

__all__ = [
    "MAX_K",
    "add_direction_",
    "add_direction_ref",
    "steer_correction_",
    "steer_correction_ref",
    "vocab_topk",
    "vocab_topk_chunked",
    "vocab_topk_ref",
]
