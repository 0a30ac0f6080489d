"""Lean VLA models and checkpoint loading.

pi0 / pi0.5 (``Pi0Config``, ``Pi0Policy``, ``load_pi0``), OpenVLA (``OpenVLAConfig``,
``OpenVLAPolicy``, ``load_openvla``, ``ActionTokenizer``), pi0-FAST (``Pi0FASTConfig``,
``Pi0FASTPolicy``, ``load_pi0fast``), the generic safetensors loader
(``checkpoint``) and input/output normalisation (``normalize``).
"""

from vlafast.models.checkpoint import CheckpointError
from vlafast.models.gemma import GemmaConfig, GemmaMLP
from vlafast.models.normalize import FeatureStats, Normalizer, StatsError
from vlafast.models.pi0 import (
    Pi0Config, Pi0Context, Pi0Observation, Pi0Policy, PrefixCache, discretize_state, make_att_2d_masks, pi05_state_prompt,
    preprocess_images, sincos_time_embedding,
)
from vlafast.models.pi0_load import load_pi0
from vlafast.models.siglip import SiglipConfig
from vlafast.models.action_tokenizer import ActionStats, ActionTokenizer
from vlafast.models.llama import KVCache, LlamaConfig, LlamaMLP
from vlafast.models.openvla import (
    EMPTY_TOKEN, GraphedDecoder, OpenVLAConfig, OpenVLAPolicy, ViTConfig, openvla_pixel_values, openvla_prompt,
)
from vlafast.models.openvla_load import load_openvla
from vlafast.models.pi0fast import (
    DecodeOutput, GraphedDecoder as Pi0FASTGraphedDecoder, Pi0FASTConfig, Pi0FASTObservation, Pi0FASTPolicy,
    pi0fast_prompt,
)
from vlafast.models.pi0fast_load import load_pi0fast

__all__ = [
    "CheckpointError", "FeatureStats", "GemmaConfig", "GemmaMLP", "Normalizer", "Pi0Config", "Pi0Context", "Pi0Observation",
    "Pi0Policy", "PrefixCache", "SiglipConfig", "StatsError", "discretize_state", "load_pi0", "make_att_2d_masks",
    "pi05_state_prompt", "preprocess_images", "sincos_time_embedding",
    # OpenVLA
    "ActionStats", "ActionTokenizer", "EMPTY_TOKEN", "GraphedDecoder", "KVCache", "LlamaConfig", "LlamaMLP",
    "OpenVLAConfig", "OpenVLAPolicy", "ViTConfig", "load_openvla", "openvla_pixel_values", "openvla_prompt",
    # pi0-FAST
    "DecodeOutput", "Pi0FASTConfig", "Pi0FASTGraphedDecoder", "Pi0FASTObservation", "Pi0FASTPolicy", "load_pi0fast",
    "pi0fast_prompt",
]
