"""SFT and on-policy RL (PPO / GRPO) for VLAs on ``VecEnv`` environments.

Everything here is plain functions over a policy and an environment; the CLI and the demo only
wire them. RL takes any policy with the RL surface ``observe`` / ``act`` / ``evaluate`` / ``value`` /
``rl_parameters`` (``observation_value``): a ``FlowPolicy`` (pi0 / pi0.5: denoising log-probs,
``flow.DenoiseTrace``) or an autoregressive one (OpenVLA, pi0-FAST: the log-probs of its sampled
action tokens, ``policies.tokens.TokenTrace``).
Axes: N chunk steps per rollout, B environments, M = N * B samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlafast._io import atomic_path, atomic_write_text
from vlafast._validate import number
from vlafast.envs.base import Obs
from vlafast.flow import sampler as flow
from vlafast.flow.sampler import FlowNoiseConfig, element_log_probs
from vlafast.rl.buffer import Rollout
from vlafast.rl.losses import PPOConfig, explained_variance, gae, group_advantages, ppo_loss
from vlafast.policies import Batch, FlowPolicy
from vlafast.policies.tokens import TokenSampler, TokenTrace, chunk_values, masked_steps
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE, SamplerSpec, Tokens, policy_sampler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algo: str = "ppo"                  # a key of ALGORITHMS: "ppo" | "grpo"
    sampler: SamplerSpec = FlowSDE()   # FlowSDE(num_steps=4, a=0.5, hybrid=True) | FlowNoise(num_steps=4) | Tokens()
    chunks_per_rollout: int = 10       # N chunk steps per env per PPO update
    iterations: int = 20
    env_step_budget: int | None = None  # end at the update that brings the env steps spent (rehearsals included)
                                       # nearest to it; iterations stays the ceiling (episode GRPO's updates cost
                                       # what its episodes last, known only once run)
    group_size: int = 8                # GRPO
    grpo_groups: Literal["episode", "state"] = "episode"  # GRPO groups: whole episodes from one seed, or
                                       # chunks from one simulator state (env.rehearse), compared on their reward
    rehearsal_bootstrap: bool = True   # GRPO over states: score a rehearsed chunk by r + gamma * V(end state), not r alone
    timeouts: Literal["terminal", "bootstrap"] = "terminal"  # an episode cut by its time limit ends there, or its
                                       # last chunk earns gamma * V(final obs). A critic that cannot see the step
                                       # index bootstraps a fixed-horizon task's time-outs from its own drift
                                       # (docs/rl-results.md: V at time-outs -0.2 -> -4.0 in 28 PPO updates)
    critic_warmup: int = 3             # runs with a critic: first updates train the critic only (an untrained
                                       # critic's advantages are noise); must be >= 1 when a critic is used
    bc_coef: float = 0.0               # weight of an auxiliary flow-matching loss on the SFT demos (DAPG-style anchor)
    bc_batch: int = 32
    grad_cosine: bool = True           # log the cosine between the policy gradients of two env halves (health)
    ppo: PPOConfig = PPOConfig()

    @property
    def uses_critic(self) -> bool:
        """Whether this run learns a value function (``ALGORITHMS[algo].critic``): PPO (GAE) and
        horizon-correct GRPO over states do."""
        return ALGORITHMS[self.algo].critic(self)

    def __post_init__(self):
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo must be one of {sorted(ALGORITHMS)}, got {self.algo!r}")
        if not isinstance(self.sampler, (FlowSDE, FlowNoise, Tokens)):
            raise ValueError(f"RL needs a stochastic sampler: sampler must be FlowSDE(...), FlowNoise(...) or "
                             f"Tokens(...) (vlafast.rl.sampler_spec), got {self.sampler!r}")
        if self.timeouts not in ("terminal", "bootstrap"):
            raise ValueError(f"timeouts must be 'terminal' or 'bootstrap', got {self.timeouts!r}")
        if self.grpo_groups not in ("episode", "state"):
            raise ValueError(f"grpo_groups must be 'episode' or 'state', got {self.grpo_groups!r}")
        if self.bc_coef < 0 or self.critic_warmup < 0:
            raise ValueError(f"bc_coef and critic_warmup must be >= 0, got {self.bc_coef}, {self.critic_warmup}")
        if self.chunks_per_rollout < 1 or self.iterations < 0:
            raise ValueError("chunks_per_rollout must be >= 1 and iterations >= 0")
        number("env_step_budget", self.env_step_budget, low=1, integer=True, optional=True)
        if self.uses_critic and self.critic_warmup < 1:
            raise ValueError(f"{self.algo} with a critic needs critic_warmup >= 1 (got 0): advantages from an untrained "
                             "critic are noise that the first actor updates would follow")


# ---------------------------------------------------------------------------------------------
# demonstrations and SFT


@dataclasses.dataclass
class Demos:
    """Scripted demonstrations: one record per chunk boundary."""

    obs: list[Obs]          # per env step: a batch of B observations
    actions: list[np.ndarray]  # per env step: [B, T, A_env] expert chunks
    episodes: int = 0

    def __len__(self) -> int:
        return sum(a.shape[0] for a in self.actions)

    def sample(self, policy: FlowPolicy, size: int, rng: np.random.Generator) -> tuple[Batch, Tensor]:
        """A random minibatch of (observation, expert chunk) pairs."""
        steps = rng.integers(0, len(self.actions), size)
        rows = rng.integers(0, self.actions[0].shape[0], size)
        obs = Obs(
            images={c: np.stack([self.obs[s]["images"][c][r] for s, r in zip(steps, rows)]) for c in self.obs[0]["images"]},
            state=np.stack([self.obs[s]["state"][r] for s, r in zip(steps, rows)]),
            instruction=[self.obs[s]["instruction"][r] for s, r in zip(steps, rows)],
        )
        actions = torch.from_numpy(np.stack([self.actions[s][r] for s, r in zip(steps, rows)])).float()
        return policy.observe(obs), actions


def collect_demos(env, episodes: int, horizon: int, exec_horizon: int, seed: int, noise: float = 0.0,
                  progress: bool = True) -> Demos:
    """Run the env's scripted expert until ``episodes`` episodes finished; record each chunk."""
    obs = env.reset(seed=seed)
    demos = Demos(obs=[], actions=[])
    bar = tqdm(total=episodes, desc="demos", disable=not progress, leave=False)
    while demos.episodes < episodes:
        chunk = env.expert_chunk(horizon, noise=noise)
        demos.obs.append(obs)
        demos.actions.append(chunk.astype(np.float32))
        obs, _, term, trunc, _ = env.step(chunk[:, :exec_horizon])
        done = int((term | trunc).sum())
        demos.episodes += done
        bar.update(done)
    bar.close()
    return demos


def sft(policy: FlowPolicy, demos: Demos, *, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
        progress: bool = True) -> list[float]:
    """Behaviour cloning on ``demos`` with the policy's own ``sft_loss`` (flow matching for pi0 /
    pi0.5, next-token cross-entropy for pi0-FAST); returns the loss per step. A pi0-FAST without
    a FAST codec first fits it (and its normaliser) on the demonstrations (``fit_codec``)."""
    if getattr(policy, "fast", False) is None:
        policy.fit_codec(np.concatenate(demos.actions), np.concatenate([o["state"] for o in demos.obs]))
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    params = [p for p in policy.model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.1)
    losses = []
    policy.train()
    bar = tqdm(range(steps), desc="sft", disable=not progress, leave=False)
    for _ in bar:
        batch, actions = demos.sample(policy, batch_size, rng)
        loss = policy.sft_loss(batch, actions, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


# ---------------------------------------------------------------------------------------------
# RL


def new_stats() -> dict[str, list]:
    """What the collectors append to: finished episodes' success / return, env steps and
    chunks sampled per chunk step."""
    return {"success": [], "return": [], "env_steps": [], "chunks": []}


def observation_value(policy, batch) -> Tensor:
    """V [B] of an observation batch: a flow policy's critic reads its encoded prefix
    (``context``), an autoregressive policy's ``value(batch)`` encodes its own."""
    if isinstance(policy, FlowPolicy):
        return policy.value(policy.context(batch), batch.state)
    return policy.value(batch)


def truncation_values(policy: FlowPolicy, terminated: np.ndarray, truncated: np.ndarray, info: dict[str, Any],
                      timeouts: str = "terminal") -> Tensor:
    """[B] V(final observation) where an episode hit its time limit (0 elsewhere): the return
    a time limit cuts off, which the collectors add as gamma * V to the last chunk's reward
    with ``timeouts="bootstrap"``. With ``"terminal"`` (``RLConfig.timeouts``' default) and for
    envs without ``info["final_obs"]`` (LIBERO, ManiSkill adapters) a time-out is terminal: 0."""
    rows = np.where(truncated & ~terminated & np.array([e is None for e in info["errors"]]))[0]
    out = torch.zeros(len(truncated))
    if timeouts == "bootstrap" and len(rows) and "final_obs" in info:
        with torch.no_grad():
            b = policy.observe(info["final_obs"]).index(torch.from_numpy(rows).to(policy.device))
            out[torch.from_numpy(rows)] = observation_value(policy, b).float().cpu()
    return out


def collect(policy: FlowPolicy, env, obs: Obs, n_chunks: int, sampler_cfg, gen: torch.Generator,
            stats: dict[str, list], gamma: float = 0.99, timeouts: str = "terminal") -> tuple[Rollout, Obs, Tensor]:
    """PPO rollout: n_chunks chunk steps of every env with auto-reset -> (rollout, last obs,
    last value [B]). With ``timeouts="bootstrap"`` truncated chunks earn gamma * V(final obs)
    on top of their reward. Finished episodes are appended to ``stats``."""
    ro = Rollout()
    B = env.spec.num_envs
    all_valid = torch.ones(B, dtype=torch.bool)
    for _ in range(n_chunks):
        batch = policy.observe(obs)
        actions, trace, value = policy.act(batch, sampler_cfg, gen)
        obs, reward, term, trunc, info = env.step(actions)
        reward_t = torch.from_numpy(reward) + gamma * truncation_values(policy, term, trunc, info, timeouts)
        ro.add(batch, trace, value.cpu(), reward_t, torch.from_numpy(term | trunc), all_valid)
        _record_episodes(stats, term | trunc, info)
        stats["env_steps"].append(int(info["steps"].sum()))
        stats["chunks"].append(B)
    with torch.no_grad():
        last_batch = policy.observe(obs)
        last_value = observation_value(policy, last_batch).cpu()
    return ro, obs, last_value


def collect_groups(policy: FlowPolicy, env, seed: int, group_size: int, sampler_cfg, gen: torch.Generator,
                   stats: dict[str, list], first_env: int = 0) -> tuple[Rollout, Tensor]:
    """GRPO rollout: envs reset in groups of ``group_size`` sharing a seed (same task), each
    runs exactly one episode -> (rollout with valid masks, episode returns [B]). ``env`` may
    be a slice of a larger vector env starting at global env ``first_env`` (a Ray worker's):
    env i gets the seed global env ``first_env + i`` would."""
    B = env.spec.num_envs
    if B % group_size or first_env % group_size:
        raise ValueError(f"GRPO needs num_envs ({B}) to be a multiple of group_size ({group_size}), and so the "
                         f"start of an env slice ({first_env})")
    obs = env.reset(seed=[seed + (first_env + i) // group_size for i in range(B)])
    alive = np.ones(B, bool)
    returns = np.zeros(B, np.float32)
    ro = Rollout()
    while alive.any():
        batch = policy.observe(obs)
        actions, trace, value = policy.act(batch, sampler_cfg, gen)
        obs, reward, term, trunc, info = env.step(actions)
        done = term | trunc
        ro.add(batch, trace, value.cpu(), torch.from_numpy(reward), torch.from_numpy(done), torch.from_numpy(alive.copy()))
        returns[alive] += reward[alive]
        _record_episodes(stats, done & alive, info)
        stats["env_steps"].append(int(info["steps"][alive].sum()))
        stats["chunks"].append(int(alive.sum()))
        alive &= ~done
    return ro, torch.from_numpy(returns)


def collect_state_groups(policy: FlowPolicy, env, obs: Obs, n_chunks: int, group_size: int, sampler_cfg,
                         gen: torch.Generator, stats: dict[str, list], *, gamma: float = 0.99, lam: float = 0.95,
                         bootstrap: bool = True, timeouts: str = "terminal") -> tuple[Rollout, Obs, Tensor, Tensor | None]:
    """GRPO over states (simulators only: it needs ``env.rehearse``): at each of n_chunks chunk
    steps, ``group_size`` chunks are sampled from every env's observation and each is rehearsed
    from that env's simulator state. A chunk's score is its reward plus, with ``bootstrap``,
    gamma * V(the state it ends in) unless it ended the episode (by success, or by the time
    limit with ``timeouts="terminal"``), so what a chunk sets up for later chunks counts
    (horizon-correct; without it the score is myopic). Scores normalised within the group are
    the advantages. The envs then go on with each group's
    first chunk. -> (rollout of B * G samples per step, last obs, advantages [N, B * G],
    critic targets [N, B * G] or None): the critic learns GAE returns of the executed path,
    shared by the G samples of a state. Comparing chunks from one state removes the
    between-state variance that episode-level advantages carry. Degenerate groups (all
    scores equal) are marked invalid."""
    if not callable(getattr(env, "rehearse", None)):
        raise ValueError("grpo_groups='state' needs an env with rehearse(actions, rows) (the built-in ur5e tasks)")
    B, G = env.spec.num_envs, group_size
    rows = torch.arange(B).repeat_interleave(G)
    ro, advs = Rollout(), []
    executed: dict[str, list[Tensor]] = {"rewards": [], "values": [], "dones": []}
    for _ in range(n_chunks):
        batch = policy.observe(obs).index(rows.to(policy.device))
        actions, trace, value = policy.act(batch, sampler_cfg, gen)
        rh = env.rehearse(actions, rows.tolist(), observe=bootstrap)
        score = torch.from_numpy(rh.reward)
        if bootstrap:
            with torch.no_grad():
                end = policy.observe(rh.obs)
                v_end = observation_value(policy, end).float().cpu()
            ended = rh.terminated | (rh.truncated if timeouts == "terminal" else False)
            score = score + gamma * torch.from_numpy(~ended).float() * v_end
        adv, informative = group_advantages(score, G)
        advs.append(adv)
        obs, reward, term, trunc, info = env.step(actions[::G])
        ro.add(batch, trace, value.cpu(), torch.from_numpy(rh.reward), torch.zeros(B * G), informative, envs=rows)
        if bootstrap:  # the executed path, for the critic (its chunk g = 0 ended as rehearsed: bit-exact)
            executed["rewards"].append(torch.from_numpy(reward) + gamma * truncation_values(policy, term, trunc, info,
                                                                                            timeouts))
            executed["values"].append(value[::G].float().cpu())
            executed["dones"].append(torch.from_numpy(term | trunc).float())
        _record_episodes(stats, term | trunc, info)
        stats["env_steps"].append(int(info["steps"].sum() + rh.steps.sum()))
        stats["chunks"].append(B * G)
    returns = None
    if bootstrap:
        with torch.no_grad():
            last = policy.observe(obs)
            last_value = observation_value(policy, last).float().cpu()
        st = {k: torch.stack(v) for k, v in executed.items()}
        _, ret = gae(st["rewards"], st["values"], st["dones"], last_value, gamma, lam)
        returns = ret.repeat_interleave(G, dim=1)
    return ro, obs, torch.stack(advs), returns


def _record_episodes(stats: dict[str, list], done: np.ndarray, info: dict[str, Any]) -> None:
    for i in np.where(done)[0]:
        stats["success"].append(bool(info["success"][i]))
        stats["return"].append(float(info["episode_return"][i]))


def _element_mask(trace) -> Tensor | None:
    """[N] or [M, N] float: the elements the log-probs count (the trace's action mask, flat; a
    token trace's valid decode steps)."""
    if isinstance(trace, TokenTrace):
        return trace.valid.float()
    m = trace.action_mask
    return None if m is None else m.reshape(*m.shape[:-2], -1)


def _elements_per_chunk(trace) -> Tensor | float:
    """Elements each chunk's log-prob sums over: a float, or [M] for per-sample masks."""
    if isinstance(trace, TokenTrace):
        return trace.valid.sum(-1).float().clamp_min(1.0)
    m = _element_mask(trace)
    if m is None:
        return float(trace.chain[0, 0].numel())
    return float(m.sum().clamp_min(1.0)) if m.ndim == 1 else m.sum(-1).clamp_min(1.0)


def policy_gradient_cosine(policy: FlowPolicy, batch: Batch, trace, adv: Tensor, idx: Tensor, envs: Tensor,
                           params: list[Tensor], micro_batch: int) -> float:
    """Cosine between the policy gradients (of -mean(A * log pi)) of the samples of even and of
    odd envs: two independent rollouts of the same policy. Near 0, the update follows noise
    (the signal-to-noise health metric); GRPO over states reaches ~0.6 on the built-in task."""
    grads = []
    for half in (idx[envs[idx] % 2 == 0], idx[envs[idx] % 2 == 1]):
        total = [torch.zeros_like(p) for p in params]
        for mb in half.split(micro_batch):
            logp, _, _ = policy.evaluate(batch.index(mb.to(policy.device)), trace.select(mb))
            g = torch.autograd.grad(-(adv[mb].to(logp.device) * logp).sum() / max(len(half), 1), params,
                                    allow_unused=True)
            total = [t + gi if gi is not None else t for t, gi in zip(total, g)]
        grads.append(torch.cat([t.reshape(-1) for t in total]))
    denom = grads[0].norm() * grads[1].norm()
    return float(grads[0] @ grads[1] / denom) if denom > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# the update: prepare -> epochs of minibatches -> (minibatch loss, optimiser step)


@dataclasses.dataclass
class Samples:
    """A rollout flattened for the update: M samples, chunk-major (sample n * B + b)."""

    batch: Batch                    # or the policy's own batch type (``index``, ``cat``, ``size``, ``state``)
    trace: flow.DenoiseTrace | TokenTrace
    valid: Tensor                   # [M] bool: samples the update trains on
    idx: Tensor                     # [M_valid] long: their indices
    envs: Tensor                    # [M] long: each sample's env
    advantages: Tensor              # [M] normalised over the valid samples
    old_log_prob: Tensor            # [M] chunk log-prob at rollout, or [M, N] per element / token (ratio "element")
    old_values: Tensor              # [M] critic at rollout
    returns: Tensor | None          # [M] critic targets; None without a critic
    element_mask: Tensor | None     # [N] or [M, N]: elements (tokens) a per-element log-prob counts
    elements_per_chunk: Tensor | float  # float or [M]: the entropy's per-element scale

    @property
    def per_element(self) -> bool:
        return self.old_log_prob.ndim == 2


def prepare(ro: Rollout, advantages: Tensor, returns: Tensor | None, cfg: PPOConfig) -> Samples:
    """Flatten ``ro``, normalise ``advantages`` [N, B] over its valid samples, and take the old
    log-probs (per chunk, or per element with ``cfg.ratio == "element"``: per action element of
    a flow chunk, per valid decode step of a token chunk, RLinf's token-level PPO) from its traces."""
    batch, trace = ro.flat()
    st = ro.stacked()
    valid = st["valid"].reshape(-1)
    idx = torch.nonzero(valid).squeeze(1)
    adv = advantages.reshape(-1).float()
    adv_valid = adv[idx]
    adv = (adv - adv_valid.mean()) / (adv_valid.std(unbiased=False) + 1e-8)  # per-rollout normalisation
    if cfg.ratio == "element":
        old_log_prob = trace.step_log_probs if isinstance(trace, TokenTrace) else element_log_probs(trace)
    else:
        old_log_prob = trace.log_prob.float()
    return Samples(batch, trace, valid, idx, st["envs"].reshape(-1), adv, old_log_prob, st["values"].reshape(-1),
                   None if returns is None else returns.reshape(-1), _element_mask(trace), _elements_per_chunk(trace))


# (policy, samples, micro-batch indices [m], cfg) -> (loss, named terms to log; approx_kl among them: the
# epochs' early stop reads it)
MinibatchLoss = Callable[[FlowPolicy, Samples, Tensor, PPOConfig], tuple[Tensor, dict[str, Tensor]]]


def ppo_clip_loss(policy: FlowPolicy, s: Samples, micro: Tensor, cfg: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (``ppo_loss``) on the samples ``micro`` -> (loss, named terms).
    Log-probs are recomputed from the stored traces through the sampler's own ``evaluate``
    (token traces: the policy's, ``token_clip_loss``); with critic targets the clipped Huber
    value loss joins, with Flow-Noise the entropy bonus (on the per-element mean entropy,
    RLinf's scale)."""
    if isinstance(s.trace, TokenTrace):
        return token_clip_loss(policy, s, micro, cfg)
    dev = policy.device
    obs, trace = s.batch.index(micro.to(dev)), s.trace.select(micro)
    ctx = policy.context(obs)
    ev = flow.evaluate(policy.velocity_fn, ctx, trace, elements=s.per_element)
    m = micro.to(ev.log_prob.device)
    terms: dict[str, Tensor] = {}
    if s.returns is not None:
        terms = dict(values=policy.value(ctx, obs.state), old_values=s.old_values.to(dev)[m],
                     returns=s.returns.to(dev)[m])
    if isinstance(s.trace.config, FlowNoiseConfig):
        per_chunk = s.elements_per_chunk
        terms["entropy"] = ev.entropy / (per_chunk if isinstance(per_chunk, float) else per_chunk.to(dev)[m])
    mask = s.element_mask if s.element_mask is None or s.element_mask.ndim == 1 else s.element_mask[micro]
    return ppo_loss(ev.element_log_prob if s.per_element else ev.log_prob, s.old_log_prob.to(dev)[m],
                    s.advantages.to(dev)[m], cfg, element_mask=mask, **terms)


def token_clip_loss(policy, s: Samples, micro: Tensor, cfg: PPOConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """``ppo_clip_loss`` for autoregressive policies: the log-probs of the stored action tokens
    under the current parameters (teacher forcing, ``policy.evaluate``), one ratio per chunk
    or, with ``cfg.ratio == "element"``, one per valid token (``policy.evaluate_steps``); the
    entropy bonus on the mean entropy per token (``TokenTrace.entropy``'s scale)."""
    dev = policy.device
    obs, trace = s.batch.index(micro.to(dev)), s.trace.select(micro)
    m = micro.to(dev)
    mask = None
    if s.per_element:
        if not callable(getattr(policy, "evaluate_steps", None)):
            raise ValueError(f"ratio 'element' needs the log-prob of each token (evaluate_steps), which "
                             f"{type(policy).__name__} does not give: use ratio 'chunk'")
        step_lp, step_ent, values = policy.evaluate_steps(obs, trace)
        logp, _ = masked_steps(step_lp, step_ent, trace.valid)
        entropy = chunk_values(step_lp, step_ent, trace.valid)[1]
        mask = s.element_mask.to(dev)[m]
    else:
        logp, entropy, values = policy.evaluate(obs, trace)
    terms: dict[str, Tensor] = {"entropy": entropy}
    if s.returns is not None:
        terms |= dict(values=values, old_values=s.old_values.to(dev)[m], returns=s.returns.to(dev)[m])
    return ppo_loss(logp, s.old_log_prob.to(dev)[m], s.advantages.to(dev)[m], cfg, element_mask=mask, **terms)


def _params(opt: torch.optim.Optimizer | None) -> list[Tensor]:
    return [] if opt is None else [p for g in opt.param_groups for p in g["params"]]


def zero_grad(actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None) -> None:
    actor_opt.zero_grad(set_to_none=True)
    if critic_opt is not None:
        critic_opt.zero_grad(set_to_none=True)


def optimiser_step(actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None, cfg: PPOConfig,
                   train_actor: bool, sync: "GradSync | None") -> None:
    """Sum the gradients over learner ranks, clip the actor's, step (the actor only past warm-up)."""
    actor_params = _params(actor_opt)
    if sync is not None:
        sync.sum_grads(actor_params + _params(critic_opt))
    torch.nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
    if train_actor:
        actor_opt.step()
    if critic_opt is not None:
        critic_opt.step()


@dataclasses.dataclass
class TermMeans:
    """Sample-weighted running means of the logged loss terms."""

    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, terms: dict[str, Tensor], n: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
            self.counts[k] = self.counts.get(k, 0) + n

    def means(self, sync: "GradSync | None") -> dict[str, float]:
        sums, counts = (self.sums, self.counts) if sync is None else sync.sum_terms(self.sums, self.counts)
        return {k: sums[k] / counts[k] for k in sums}


def run_epoch(policy: FlowPolicy, s: Samples, cfg: PPOConfig, loss_fn: MinibatchLoss,
              actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None, shuffle: torch.Generator,
              means: TermMeans, train_actor: bool, bc: tuple[float, Callable[[], Tensor]] | None,
              sync: "GradSync | None") -> float:
    """One pass over the valid samples in shuffled minibatches of ``cfg.minibatch``, each one
    optimiser step accumulated over micro-batches (this rank's share of them) -> the epoch's
    mean approx_kl over all ranks."""
    rank, world = (sync.rank, sync.world) if sync is not None else (0, 1)
    kl_sum = 0.0
    perm = s.idx[torch.randperm(len(s.idx), generator=shuffle)]
    for mb in perm.split(cfg.minibatch or len(s.idx)):
        zero_grad(actor_opt, critic_opt)
        for micro in mb.tensor_split(world)[rank].split(cfg.micro_batch):
            loss, terms = loss_fn(policy, s, micro, cfg)
            (loss * (len(micro) / len(mb))).backward()
            means.add(terms, len(micro))
            kl_sum += float(terms["approx_kl"]) * len(micro)
        if bc is not None and train_actor and rank == 0:
            bc_loss = bc[1]()
            (bc[0] * bc_loss).backward()
            means.add({"bc_loss": bc_loss.detach()}, len(mb))
        optimiser_step(actor_opt, critic_opt, cfg, train_actor, sync)
    if sync is not None:
        kl_sum = sync.sum_floats([kl_sum])[0]
    return kl_sum / max(len(perm), 1)


def update(policy: FlowPolicy, ro: Rollout, advantages: Tensor, returns: Tensor | None, cfg: PPOConfig,
           actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None,
           shuffle: torch.Generator, train_actor: bool = True,
           bc: tuple[float, Callable[[], Tensor]] | None = None, grad_cosine: bool = False,
           sync: "GradSync | None" = None, loss: MinibatchLoss = ppo_clip_loss) -> dict[str, float]:
    """Epochs of ``loss`` (the algorithm's minibatch loss, ``ALGORITHMS[algo].loss``) over the
    rollout's valid samples; returns sample-weighted mean loss terms. Each optimiser step sees
    ``cfg.minibatch`` samples (None: all of them), accumulated over micro-batches; the epochs
    stop early once an epoch's approx_kl exceeds ``cfg.target_kl``. ``returns`` None means no
    critic. ``bc`` = (coef, loss_fn) adds coef * loss_fn() (a demonstration flow-matching loss)
    to every actor step.

    With ``sync`` (data-parallel learners, ``vlafast.rl.dist``), every rank holds the same
    rollout, parameters and ``shuffle`` state and takes its share of each minibatch; gradients
    are summed over ranks before clipping, so every rank takes the same step as one learner
    would. BC and the gradient-cosine health metric run on rank 0 only."""
    policy.train()
    if not any(bool(v.any()) for v in ro.valid):  # GRPO: every group's returns were equal (all failed, or alike)
        log.warning("no sample of this rollout carries a signal (every group is degenerate): the update is skipped")
        return {"epochs": 0.0, "approx_kl": 0.0}
    s = prepare(ro, advantages, returns, cfg)
    out: dict[str, float] = {}
    if grad_cosine and train_actor and len(s.idx) > 1 and (sync is None or sync.rank == 0):
        out["grad_cosine"] = policy_gradient_cosine(policy, s.batch, s.trace, s.advantages, s.idx, s.envs,
                                                    _params(actor_opt), cfg.micro_batch)
    means = TermMeans()
    for epochs in range(1, cfg.epochs + 1):
        approx_kl = run_epoch(policy, s, cfg, loss, actor_opt, critic_opt, shuffle, means, train_actor, bc, sync)
        if cfg.target_kl is not None and approx_kl > cfg.target_kl:
            break
    out.update(means.means(sync))  # every rank's terms (bc_loss: rank 0's)
    out["epochs"] = float(epochs)
    if returns is not None:
        out["explained_variance"] = explained_variance(s.old_values[s.valid], s.returns[s.valid])
    if isinstance(s.trace, flow.DenoiseTrace):  # the flow sampler's noise levels (token traces have none)
        sig = s.trace.sigmas[s.trace.stochastic] if s.trace.stochastic.any() else s.trace.sigmas.new_zeros(1)
        out["sigma_mean"] = float(sig.float().mean())
        out["sigma_max"] = float(sig.float().max())
    return out


# ---------------------------------------------------------------------------------------------
# algorithms: how an update's rollout is collected and scored, and its minibatch loss


def rl_sampler(policy: FlowPolicy, cfg: RLConfig) -> flow.SamplerConfig | TokenSampler:
    """The stochastic sampler RL collects and updates with (one sentence when ``cfg.sampler`` is
    for the other kind of policy: ``sampler_spec.policy_sampler``)."""
    return policy_sampler(cfg.sampler, policy)


def reset_seeds(seed: int, iteration: int, first_env: int, num_envs: int) -> list[int]:
    """Seeds of envs [first_env, first_env + num_envs) of a vector env that a run starting (or
    resuming, or a worker restarting) at ``iteration`` resets: ``env.reset(seed=s)`` of the
    whole vector env gives env i the seed s + i, so a slice gets the seeds its envs would."""
    base = seed + 10_000 * iteration
    return [base + first_env + i for i in range(num_envs)]


def stream_seed(seed: int, worker: int, iteration: int) -> int:
    """The sampler-noise seed of rollout worker ``worker`` created at ``iteration``: ``seed``
    itself for worker 0 at 0 (the in-process run), distinct streams otherwise."""
    return seed + 1_000_003 * worker + 7_919 * iteration


RolloutResult = tuple[Rollout, Obs | None, Tensor, Tensor | None]


def gae_rollout(policy: FlowPolicy, env, obs: Obs | None, cfg: RLConfig, it: int, seed: int,
                sampler_cfg: flow.SamplerConfig, gen: torch.Generator, stats: dict[str, list],
                first_env: int) -> RolloutResult:
    """PPO: ``cfg.chunks_per_rollout`` chunk steps of every env, advantages and critic targets by GAE."""
    ro, obs, last_value = collect(policy, env, obs, cfg.chunks_per_rollout, sampler_cfg, gen, stats, cfg.ppo.gamma,
                                  cfg.timeouts)
    st = ro.stacked()
    adv, ret = gae(st["rewards"], st["values"], st["dones"], last_value, cfg.ppo.gamma, cfg.ppo.lam)
    return ro, obs, adv, ret


def group_rollout(policy: FlowPolicy, env, obs: Obs | None, cfg: RLConfig, it: int, seed: int,
                  sampler_cfg: flow.SamplerConfig, gen: torch.Generator, stats: dict[str, list],
                  first_env: int) -> RolloutResult:
    """GRPO: advantages normalised within groups, of chunks from one simulator state
    (``grpo_groups="state"``) or of whole episodes from one seed (no critic targets)."""
    if cfg.grpo_groups == "state":
        return collect_state_groups(policy, env, obs, cfg.chunks_per_rollout, cfg.group_size, sampler_cfg, gen,
                                    stats, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam, bootstrap=cfg.rehearsal_bootstrap,
                                    timeouts=cfg.timeouts)
    ro, ep_returns = collect_groups(policy, env, seed + 1000 * it, cfg.group_size, sampler_cfg, gen, stats,
                                    first_env=first_env)
    ep_adv, informative = group_advantages(ep_returns, cfg.group_size)
    ro.valid = [v & informative for v in ro.valid]
    return ro, obs, ep_adv[None].expand(len(ro), -1), None


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """An RL algorithm: its rollout (collect, then advantages and critic targets), its
    minibatch loss, and whether a config of it learns a value function. A new algorithm is a
    new entry of ``ALGORITHMS``."""

    rollout: Callable[..., RolloutResult]
    loss: MinibatchLoss
    critic: Callable[[RLConfig], bool]


def _grpo_critic(cfg: RLConfig) -> bool:
    """GRPO over states scoring chunks by r + gamma * V(end state) learns V; other GRPO does not."""
    return cfg.grpo_groups == "state" and cfg.rehearsal_bootstrap


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(rollout=gae_rollout, loss=ppo_clip_loss, critic=lambda cfg: True),
    "grpo": Algorithm(rollout=group_rollout, loss=ppo_clip_loss, critic=_grpo_critic),  # same clipped loss
}


def collect_iteration(policy: FlowPolicy, env, obs: Obs | None, cfg: RLConfig, it: int, seed: int,
                      gen: torch.Generator, stats: dict[str, list], first_env: int = 0
                      ) -> tuple[Rollout, Obs | None, Tensor, Tensor | None]:
    """One update's rollout by ``cfg.algo`` -> (rollout [N, B], next obs, advantages [N, B],
    critic targets [N, B] or None without a critic). Advantages here are per env (GAE, or
    normalised within groups of envs / of one env's chunks), so slices of a vector env can be
    collected apart (``first_env``: where this slice starts) and their samples pooled."""
    rollout = ALGORITHMS[cfg.algo].rollout
    ro, obs, adv, ret = rollout(policy, env, obs, cfg, it, seed, rl_sampler(policy, cfg), gen, stats, first_env)
    if first_env:
        ro.envs = [e + first_env for e in ro.envs]
    return ro, obs, adv, ret


class GradSync(Protocol):
    """Data-parallel learners' reductions (``update(..., sync=)``): ``vlafast.rl.dist.TorchGradSync``."""

    rank: int
    world: int

    def sum_grads(self, params: list[Tensor]) -> None: ...

    def sum_floats(self, values: list[float]) -> list[float]: ...

    def sum_terms(self, sums: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]: ...


class Learners(Protocol):
    """More learner ranks for the update (``vlafast.rl.dist.LearnerGroup``): ``start`` them with
    this process's state, then ``update`` has ``update``'s signature."""

    def start(self, policy: FlowPolicy, actor_opt: torch.optim.Optimizer,
              critic_opt: torch.optim.Optimizer | None) -> None: ...

    def update(self, policy: FlowPolicy, ro: Rollout, advantages: Tensor, returns: Tensor | None, cfg: PPOConfig,
               actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None, shuffle: torch.Generator,
               **kwargs: Any) -> dict[str, float]: ...


class Collector(Protocol):
    """Where an update's rollout comes from: ``collect(policy, iteration, stats)`` -> (rollout,
    advantages, critic targets or None, extra scalars for the metrics row)."""

    def collect(self, policy: FlowPolicy, iteration: int, stats: dict[str, list]
                ) -> tuple[Rollout, Tensor, Tensor | None, dict[str, float]]: ...


class LocalCollector:
    """Rollouts in this process: ``policy`` samples, ``env`` steps. ``env`` may be the slice of
    a larger vector env that starts at global env ``first_env`` (what a Ray worker runs); its
    envs then get the seeds and ids they have in the whole."""

    def __init__(self, env, cfg: RLConfig, seed: int, gen: torch.Generator, first_env: int = 0):
        self.env, self.cfg, self.seed, self.gen, self.first_env = env, cfg, seed, gen, first_env
        self.obs: Obs | None = None

    def collect(self, policy: FlowPolicy, iteration: int, stats: dict[str, list]
                ) -> tuple[Rollout, Tensor, Tensor | None, dict[str, float]]:
        if self.obs is None:
            self.obs = self.env.reset(seed=reset_seeds(self.seed, iteration, self.first_env, self.env.spec.num_envs))
        ro, self.obs, adv, ret = collect_iteration(policy, self.env, self.obs, self.cfg, iteration, self.seed,
                                                   self.gen, stats, self.first_env)
        return ro, adv, ret, {}


def make_optimizers(policy: FlowPolicy, cfg: RLConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(actor AdamW, critic AdamW or None without a critic) over ``policy.rl_parameters()``."""
    actor, critic = policy.rl_parameters()
    betas = cfg.ppo.betas
    actor_opt = torch.optim.AdamW(actor, lr=cfg.ppo.actor_lr, betas=betas)
    critic_opt = torch.optim.AdamW(critic, lr=cfg.ppo.critic_lr, betas=betas) if cfg.uses_critic else None
    return actor_opt, critic_opt


def demo_loss(policy, bc_coef: float) -> Callable[..., Tensor]:
    """The supervised loss the BC anchor (``bc_coef`` > 0) adds on demonstrations: the policy's
    ``sft_loss`` (flow matching for pi0 / pi0.5, cross-entropy of the demonstrated action tokens
    for pi0-FAST); one sentence when the policy has none."""
    loss = getattr(policy, "sft_loss", None)
    if not callable(loss):
        raise ValueError(f"bc_coef={bc_coef} anchors on a supervised loss on the demonstrations, which a "
                         f"{type(policy).__name__} has not: set rl.bc_coef to 0")
    return loss


def _restore_rng(state: dict[str, Any], key: str, restore: Callable[[Any], None]) -> None:
    """Restore one RNG state from a checkpoint; checkpoints older than the key keep the fresh
    seed-derived state, with a warning (their resumed run is then not bit-reproducible)."""
    if key in state:
        restore(state[key])
    else:
        log.warning("checkpoint has no %r (written by an older vlafast): it starts from its seed", key)


def budget_spent(history: list[dict[str, float]], budget: int | None) -> bool:
    """Whether a run with these updates should stop for an env-step ``budget``: when another
    update like the last would end farther from it than stopping now (spent + last / 2 >= budget)."""
    if budget is None or not history:
        return False
    return sum(h["env_steps"] for h in history) + history[-1]["env_steps"] / 2 >= budget


def train_rl(policy: FlowPolicy, env, cfg: RLConfig, *, seed: int, run_dir: str | Path | None = None,
             demos: Demos | None = None,
             resume: bool = False, progress: bool = True,
             on_iteration: Callable[[int, dict[str, float]], None] | None = None,
             collector: "Collector | None" = None, learners: "Learners | None" = None) -> list[dict[str, float]]:
    """PPO or GRPO for ``cfg.iterations`` updates. Logs per update: success_rate, return,
    approx_kl, clipfrac, explained_variance (PPO), sigma stats, env_steps_per_s, chunks_per_s.
    With ``run_dir``, a checkpoint is written atomically after every update and ``resume``
    continues from it. Rollouts come from ``collector`` (default: ``LocalCollector`` over
    ``env`` in this process; ``vlafast.rl.dist.RayCollector`` spreads them over Ray workers).
    ``learners`` (``vlafast.rl.dist.LearnerGroup``) runs each update data-parallel with more
    ranks; this process is rank 0 and writes the checkpoints."""
    actor, critic = policy.rl_parameters()
    actor_opt, critic_opt = make_optimizers(policy, cfg)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed + 1)  # minibatch order, CPU
    bc = None
    bc_rng = np.random.default_rng(seed + 2)                              # demo minibatches
    bc_gen = torch.Generator(device=policy.device).manual_seed(seed + 3)  # their flow-matching noise
    if cfg.bc_coef > 0:
        bc_loss = demo_loss(policy, cfg.bc_coef)
        if demos is None:
            raise ValueError(f"bc_coef={cfg.bc_coef} needs the demonstrations: train_rl(..., demos=...)")
        bc = (cfg.bc_coef, lambda: bc_loss(*demos.sample(policy, cfg.bc_batch, bc_rng), generator=bc_gen))
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"--resume needs a checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location=policy.device, weights_only=True)  # tensors and plain data only
        policy.load_state_dict(state["policy"])
        actor_opt.load_state_dict(state["actor_opt"])
        if critic_opt is not None and state.get("critic_opt") is not None:
            critic_opt.load_state_dict(state["critic_opt"])
        elif critic_opt is not None:
            log.warning("checkpoint has no critic optimiser state (written by a run without a critic): it starts fresh")
        gen.set_state(state["generator"])
        shuffle.set_state(state["shuffle"])
        _restore_rng(state, "bc_rng", lambda s: setattr(bc_rng.bit_generator, "state", s))
        _restore_rng(state, "bc_generator", bc_gen.set_state)
        history, start = state["history"], state["iteration"]
    if collector is None:
        collector = LocalCollector(env, cfg, seed, gen)
    # Only the actor and critic learn: the frozen VLM gets no gradients (the BC loss runs the
    # full forward) and the SFT weights outside RL stay bit-identical.
    step = update
    if learners is not None:
        learners.start(policy, actor_opt, critic_opt)
        step = learners.update
    trainable = {id(p) for p in actor + critic}
    frozen = [p for p in policy.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    try:
        bar = tqdm(range(start, cfg.iterations), desc=cfg.algo, disable=not progress, initial=start, total=cfg.iterations)
        for it in bar:
            stats = new_stats()
            t0 = time.perf_counter()
            ro, adv, ret, collector_info = collector.collect(policy, it, stats)
            t_roll = time.perf_counter() - t0
            terms = step(policy, ro, adv, ret, cfg.ppo, actor_opt, critic_opt, shuffle,
                         train_actor=it >= cfg.critic_warmup or critic_opt is None, bc=bc, grad_cosine=cfg.grad_cosine,
                         loss=ALGORITHMS[cfg.algo].loss)
            chunks = sum(stats["chunks"])
            row = {
                "iteration": it + 1,
                "success_rate": float(np.mean(stats["success"])) if stats["success"] else float("nan"),
                "return": float(np.mean(stats["return"])) if stats["return"] else float("nan"),
                "episodes": len(stats["success"]),
                "env_steps": float(sum(stats["env_steps"])),  # simulated control steps, rehearsals included
                "env_steps_per_s": sum(stats["env_steps"]) / t_roll,
                "chunks_per_s": chunks / t_roll,
                "update_s": time.perf_counter() - t0 - t_roll,
                **collector_info,
                **terms,
            }
            history.append(row)
            bar.set_postfix(success=f"{row['success_rate']:.2f}", kl=f"{row['approx_kl']:.4f}")
            if ckpt is not None:
                with atomic_path(ckpt) as tmp:
                    torch.save({"policy": policy.state_dict(), "actor_opt": actor_opt.state_dict(),
                                "critic_opt": critic_opt.state_dict() if critic_opt is not None else None,
                                "generator": gen.get_state(), "shuffle": shuffle.get_state(), "history": history, "iteration": it + 1,
                                "bc_rng": bc_rng.bit_generator.state, "bc_generator": bc_gen.get_state(),
                                "config": dataclasses.asdict(cfg)}, tmp)
                atomic_write_text(Path(run_dir) / "metrics.json", json.dumps(history, indent=1))
            if on_iteration is not None:
                on_iteration(it + 1, row)
            if budget_spent(history, cfg.env_step_budget):
                break
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history
