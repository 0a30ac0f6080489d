"""Mechanistic interpretability and steering (docs/architecture.md §2).

* ``NeuronDictionary``: every MLP neuron's value vector projected onto the output vocabulary
  (fused top-k op), saved as one safetensors file; ``search`` / ``explain``.
* ``cluster`` + ``KEYWORDS``: neuron sets by keyword (direction up/down, speed fast/slow, care);
  ``read_cluster_file`` / ``write_cluster_file``: clusters in the paper's form (flat ids).
* ``SteeringPlan`` (clamp neurons, hook-free, per-request alpha / mask in device buffers) and
  ``DirectionPlan`` (add a residual-stream vector), for pi0 and OpenVLA.
* ``vlafast.interp.behaviour``: steered vs unsteered end-effector speed on the built-in task.
"""

from vlafast.interp.cluster_files import ClusterFileError, read_cluster_file, write_cluster_file
from vlafast.interp.clusters import KEYWORDS, Cluster, cluster
from vlafast.interp.dictionary import Explanation, NeuronDictionary, SearchHit, load_tokens, normalize_token
from vlafast.interp.steering import DirectionPlan, SteeringPlan

__all__ = [
    "KEYWORDS", "Cluster", "ClusterFileError", "DirectionPlan", "Explanation", "NeuronDictionary", "SearchHit", "SteeringPlan", "cluster",
    "load_tokens", "normalize_token", "read_cluster_file", "write_cluster_file",
]
