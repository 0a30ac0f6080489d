"""Flow-matching sampling with exact log-probs: ODE, Flow-SDE, Flow-Noise; DenoiseTrace; CUDA graphs;
real-time chunking (RTC) as a guidance option of the ODE sampler.

    from vlafast import flow
    cfg = flow.flow_sde(a=0.5, hybrid=True, num_steps=4)
    actions, trace = flow.sample(cfg, velocity_fn, ctx, noise, generator=g, action_mask=m)
    logp = flow.log_prob(velocity_fn, ctx, trace)          # [B], differentiable, == trace.log_prob
    rtc = flow.RTCGuidance(prefix, flow.prefix_weights(T, d, s), max_guidance=5.0)
    actions, _ = flow.sample(flow.ode(10), velocity_fn, ctx, noise, guidance=rtc)
"""

from vlafast.flow.graphs import GraphedSampler
from vlafast.flow.noise_head import DEFAULT_LOGVAR_BOUNDS, NoiseHead
from vlafast.flow.rtc import RTCGuidance, prefix_weights
from vlafast.flow.sampler import (
    DenoiseTrace,
    FlowLogProb,
    FlowNoiseConfig,
    FlowSDEConfig,
    ODEConfig,
    SamplerConfig,
    element_log_probs,
    evaluate,
    flow_noise,
    flow_sde,
    log_prob,
    ode,
    sample,
    sde_sigmas,
    time_grid,
)

__all__ = [
    "DEFAULT_LOGVAR_BOUNDS", "DenoiseTrace", "FlowLogProb", "FlowNoiseConfig", "FlowSDEConfig",
    "GraphedSampler", "NoiseHead", "ODEConfig", "RTCGuidance", "SamplerConfig", "element_log_probs", "evaluate",
    "flow_noise", "flow_sde", "log_prob", "ode", "prefix_weights", "sample", "sde_sigmas", "time_grid",
]
