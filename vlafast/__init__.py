"""vlafast: fast vision-language-action models.

Fused steering kernels (``vlafast.ops``), flow-policy sampling with exact log-probs
(``vlafast.flow``), lean pi0 / OpenVLA models (``vlafast.models``) and a real-time robot
loop (``vlafast.robot``). The compiled core ``vlafast._C`` is imported lazily through
``vlafast._ext.load_C()`` so pure-Python parts work without it.
"""

__version__ = "0.1.0"
