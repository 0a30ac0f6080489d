"""SFT, evaluation and on-policy RL (PPO / GRPO) for flow VLAs on ``VecEnv`` environments.

Everything here is plain functions over a ``VLAPolicy`` and an environment; the CLI and the
demo only wire them. Axes: N chunk steps per rollout, B environments, M = N * B samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vlafast._io import atomic_path, atomic_write_text
from vlafast.envs.base import Obs
from vlafast.flow.sampler import FlowNoiseConfig
from vlafast.rl.buffer import Rollout
from vlafast.rl.losses import PPOConfig, explained_variance, gae, group_advantages, ppo_loss
from vlafast.rl.policy import Batch, VLAPolicy

log = logging.getLogger(__name__)

Method = Literal["flow_sde", "flow_noise"]


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algo: Literal["ppo", "grpo"] = "ppo"
    method: Method = "flow_sde"
    num_steps: int = 4                 # K denoise steps in training (pi_RL: 4 for pi0)
    sde_a: float = 0.5                 # Flow-SDE noise level
    sde_hybrid: bool = True            # Flow-SDE: one stochastic step per chunk (else all K, joint log-prob)
    chunks_per_rollout: int = 10       # N chunk steps per env per PPO update
    iterations: int = 20
    group_size: int = 8                # GRPO
    grpo_groups: Literal["episode", "state"] = "episode"  # GRPO groups: whole episodes from one seed, or
                                       # chunks from one simulator state (env.rehearse), compared on their reward
    critic_warmup: int = 0             # PPO: first updates train the critic only (the actor waits for useful advantages)
    bc_coef: float = 0.0               # weight of an auxiliary flow-matching loss on the SFT demos (DAPG-style anchor)
    bc_batch: int = 32
    ppo: PPOConfig = PPOConfig()

    def __post_init__(self):
        if self.algo not in ("ppo", "grpo"):
            raise ValueError(f"algo must be 'ppo' or 'grpo', got {self.algo!r}")
        if self.method not in ("flow_sde", "flow_noise"):
            raise ValueError(f"RL needs a stochastic sampler: method must be flow_sde or flow_noise, got {self.method!r}")
        if self.grpo_groups not in ("episode", "state"):
            raise ValueError(f"grpo_groups must be 'episode' or 'state', got {self.grpo_groups!r}")
        if self.bc_coef < 0 or self.critic_warmup < 0:
            raise ValueError(f"bc_coef and critic_warmup must be >= 0, got {self.bc_coef}, {self.critic_warmup}")
        if self.chunks_per_rollout < 1 or self.iterations < 0:
            raise ValueError("chunks_per_rollout must be >= 1 and iterations >= 0")


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

    def sample(self, policy: VLAPolicy, size: int, rng: np.random.Generator) -> tuple[Batch, Tensor]:
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


def sft(policy: VLAPolicy, demos: Demos, *, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
        progress: bool = True) -> list[float]:
    """Flow-matching behaviour cloning on ``demos``; returns the loss per step."""
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
        loss = policy.flow_matching_loss(batch, actions, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(policy: VLAPolicy, env, *, episodes: int, seed: int, num_steps: int = 4,
             sampler=None, progress: bool = True) -> dict[str, Any]:
    """Evaluation on fixed seeds: success rate, return, and the behaviour metric (mean
    end-effector displacement per step, when the env reports it). Deterministic ODE sampling
    with ``num_steps`` unless ``sampler`` (a flow sampler config, e.g. the training Flow-SDE)
    is given. Each env runs whole episodes; exactly ``episodes`` are counted."""
    policy.eval()
    cfg = sampler if sampler is not None else policy.sampler_config("ode", num_steps)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    obs = env.reset(seed=seed)
    B = env.spec.num_envs
    records: list[dict[str, Any]] = []
    started = [0] * B                      # episodes begun by each env
    per_env = math.ceil(episodes / B)
    bar = tqdm(total=episodes, desc="eval", disable=not progress, leave=False)
    while len(records) < episodes:
        actions, _, _ = policy.act(policy.observe(obs), cfg, gen)
        instr = list(obs["instruction"])
        obs, _, term, trunc, info = env.step(actions)
        for i in np.where(term | trunc)[0]:
            if started[i] < per_env and len(records) < episodes:
                records.append({
                    "env": int(i), "index": started[i],  # env i's n-th episode: pairs runs episode by episode
                    "instruction": instr[i], "success": bool(info["success"][i]),
                    "return": float(info["episode_return"][i]),
                    "speed": float(info.get("episode_speed", np.full(B, np.nan))[i]),
                })
                bar.update(1)
            started[i] += 1
    bar.close()
    success = np.array([r["success"] for r in records], float)
    out = {
        "episodes": len(records),
        "success_rate": float(success.mean()),
        "success_ci95": float(1.96 * math.sqrt(max(success.mean() * (1 - success.mean()), 1e-12) / len(records))),
        "return": float(np.mean([r["return"] for r in records])),
        "records": records,
    }
    return out


# ---------------------------------------------------------------------------------------------
# RL


def collect(policy: VLAPolicy, env, obs: Obs, n_chunks: int, sampler_cfg, gen: torch.Generator,
            stats: dict[str, list]) -> tuple[Rollout, Obs, Tensor]:
    """PPO rollout: n_chunks chunk steps of every env with auto-reset -> (rollout, last obs,
    last value [B]). Finished episodes are appended to ``stats``."""
    ro = Rollout()
    B = env.spec.num_envs
    all_valid = torch.ones(B, dtype=torch.bool)
    for _ in range(n_chunks):
        batch = policy.observe(obs)
        actions, trace, value = policy.act(batch, sampler_cfg, gen)
        obs, reward, term, trunc, info = env.step(actions)
        done = torch.from_numpy(term | trunc)
        ro.add(batch, trace, value.cpu(), torch.from_numpy(reward), done, all_valid)
        _record_episodes(stats, term | trunc, info)
        stats["env_steps"].append(int(info["steps"].sum()))
    with torch.no_grad():
        last_batch = policy.observe(obs)
        last_value = policy.value(policy.context(last_batch), last_batch.state).cpu()
    return ro, obs, last_value


def collect_groups(policy: VLAPolicy, env, seed: int, group_size: int, sampler_cfg, gen: torch.Generator,
                   stats: dict[str, list]) -> tuple[Rollout, Tensor]:
    """GRPO rollout: envs reset in groups of ``group_size`` sharing a seed (same task), each
    runs exactly one episode -> (rollout with valid masks, episode returns [B])."""
    B = env.spec.num_envs
    if B % group_size:
        raise ValueError(f"GRPO needs num_envs ({B}) to be a multiple of group_size ({group_size})")
    obs = env.reset(seed=[seed + i // group_size for i in range(B)])
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
        alive &= ~done
    return ro, torch.from_numpy(returns)


def collect_state_groups(policy: VLAPolicy, env, obs: Obs, n_chunks: int, group_size: int, sampler_cfg,
                         gen: torch.Generator, stats: dict[str, list]) -> tuple[Rollout, Obs, Tensor]:
    """GRPO over states: at each of n_chunks chunk steps, ``group_size`` chunks are sampled from
    every env's current observation and each is rehearsed from that env's simulator state
    (``env.rehearse``); advantages are their chunk rewards normalised within the group. The
    envs then go on with the group's first chunk. -> (rollout of B * G samples per step, last
    obs, advantages [N, B * G]). Comparing chunks from one state removes the between-state
    variance that episode-level advantages carry."""
    if not callable(getattr(env, "rehearse", None)):
        raise ValueError("grpo_groups='state' needs an env with rehearse(actions, rows) (the built-in ur5e tasks)")
    B, G = env.spec.num_envs, group_size
    rows = torch.arange(B).repeat_interleave(G)
    ro, advs = Rollout(), []
    valid = torch.ones(B * G, dtype=torch.bool)
    for _ in range(n_chunks):
        batch = policy.observe(obs).index(rows.to(policy.device))
        actions, trace, value = policy.act(batch, sampler_cfg, gen)
        reward, steps = env.rehearse(actions, rows.tolist())
        reward_t = torch.from_numpy(reward)
        advs.append(group_advantages(reward_t, G))
        obs, _, term, trunc, info = env.step(actions[::G])
        ro.add(batch, trace, value.cpu(), reward_t, torch.zeros(B * G), valid)
        _record_episodes(stats, term | trunc, info)
        stats["env_steps"].append(int(info["steps"].sum() + steps.sum()))
    return ro, obs, torch.stack(advs)


def _record_episodes(stats: dict[str, list], done: np.ndarray, info: dict[str, Any]) -> None:
    for i in np.where(done)[0]:
        stats["success"].append(bool(info["success"][i]))
        stats["return"].append(float(info["episode_return"][i]))


def update(policy: VLAPolicy, ro: Rollout, advantages: Tensor, returns: Tensor | None, cfg: PPOConfig,
           actor_opt: torch.optim.Optimizer, critic_opt: torch.optim.Optimizer | None,
           shuffle: torch.Generator, train_actor: bool = True,
           bc: tuple[float, Callable[[], Tensor]] | None = None) -> dict[str, float]:
    """PPO epochs over minibatches of the rollout's valid samples; returns mean loss terms.
    ``returns`` None means GRPO (no critic). ``bc`` = (coef, loss_fn) adds coef * loss_fn()
    (a demonstration flow-matching loss) to every actor minibatch."""
    policy.train()
    batch, trace = ro.flat()
    st = ro.stacked()
    valid = st["valid"].reshape(-1)
    old_logp = trace.log_prob.float()
    old_values = st["values"].reshape(-1)
    adv = advantages.reshape(-1)
    idx_all = torch.nonzero(valid).squeeze(1)
    adv_valid = adv[idx_all]
    adv = (adv - adv_valid.mean()) / (adv_valid.std(unbiased=False) + 1e-8)  # per-rollout normalisation
    terms: dict[str, list[float]] = {}
    actor_params = [p for g in actor_opt.param_groups for p in g["params"]]
    for _ in range(cfg.epochs):
        perm = idx_all[torch.randperm(len(idx_all), generator=shuffle)]
        for start in range(0, len(perm), cfg.minibatch):
            mb = perm[start:start + cfg.minibatch]
            logp, entropy, value = policy.evaluate(batch.index(mb.to(policy.device)), trace.select(mb))
            mb_dev = mb.to(logp.device)
            kwargs: dict[str, Tensor] = {}
            if returns is not None:
                kwargs = dict(values=value, old_values=old_values.to(logp.device)[mb_dev],
                              returns=returns.reshape(-1).to(logp.device)[mb_dev])
            if isinstance(trace.config, FlowNoiseConfig):
                kwargs["entropy"] = entropy
            loss, t = ppo_loss(logp, old_logp.to(logp.device)[mb_dev], adv.to(logp.device)[mb_dev], cfg, **kwargs)
            if bc is not None and train_actor:
                bc_loss = bc[1]()
                loss = loss + bc[0] * bc_loss
                t["bc_loss"] = bc_loss.detach()
            actor_opt.zero_grad(set_to_none=True)
            if critic_opt is not None:
                critic_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor_params, cfg.max_grad_norm)
            if train_actor:
                actor_opt.step()
            if critic_opt is not None:
                critic_opt.step()
            for k, v in t.items():
                terms.setdefault(k, []).append(float(v))
    out = {k: float(np.mean(v)) for k, v in terms.items()}
    if returns is not None:
        out["explained_variance"] = explained_variance(old_values[valid], returns.reshape(-1)[valid])
    sig = trace.sigmas[trace.stochastic] if trace.stochastic.any() else trace.sigmas.new_zeros(1)
    out["sigma_mean"] = float(sig.float().mean())
    out["sigma_max"] = float(sig.float().max())
    return out


def train_rl(policy: VLAPolicy, env, cfg: RLConfig, *, seed: int, run_dir: str | Path | None = None,
             demos: Demos | None = None,
             resume: bool = False, progress: bool = True,
             on_iteration: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """PPO or GRPO for ``cfg.iterations`` updates. Logs per update: success_rate, return,
    approx_kl, clipfrac, explained_variance (PPO), sigma stats, env_steps_per_s, chunks_per_s.
    With ``run_dir``, a checkpoint is written atomically after every update and ``resume``
    continues from it."""
    actor, critic = policy.rl_parameters()
    betas = cfg.ppo.betas
    actor_opt = torch.optim.AdamW(actor, lr=cfg.ppo.actor_lr, betas=betas)
    critic_opt = torch.optim.AdamW(critic, lr=cfg.ppo.critic_lr, betas=betas) if cfg.algo == "ppo" else None
    sampler_cfg = policy.sampler_config(cfg.method, cfg.num_steps, cfg.sde_a, hybrid=cfg.sde_hybrid)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed + 1)  # minibatch order, CPU
    bc = None
    bc_rng = np.random.default_rng(seed + 2)                              # demo minibatches
    bc_gen = torch.Generator(device=policy.device).manual_seed(seed + 3)  # their flow-matching noise
    if cfg.bc_coef > 0:
        if demos is None:
            raise ValueError(f"bc_coef={cfg.bc_coef} needs the demonstrations: train_rl(..., demos=...)")
        bc = (cfg.bc_coef, lambda: policy.flow_matching_loss(*demos.sample(policy, cfg.bc_batch, bc_rng), generator=bc_gen))
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise FileNotFoundError(f"--resume needs a checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location=policy.device, weights_only=False)
        policy.load_state_dict(state["policy"])
        actor_opt.load_state_dict(state["actor_opt"])
        if critic_opt is not None:
            critic_opt.load_state_dict(state["critic_opt"])
        gen.set_state(state["generator"])
        shuffle.set_state(state["shuffle"])
        bc_rng.bit_generator.state = state["bc_rng"]
        bc_gen.set_state(state["bc_generator"])
        history, start = state["history"], state["iteration"]
    obs = env.reset(seed=seed + 10_000 * start)
    # Only the actor and critic learn: the frozen VLM gets no gradients (the BC loss runs the
    # full forward) and the SFT weights outside RL stay bit-identical.
    trainable = {id(p) for p in actor + critic}
    frozen = [p for p in policy.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    try:
        bar = tqdm(range(start, cfg.iterations), desc=cfg.algo, disable=not progress, initial=start, total=cfg.iterations)
        for it in bar:
            stats: dict[str, list] = {"success": [], "return": [], "env_steps": []}
            t0 = time.perf_counter()
            if cfg.algo == "ppo":
                ro, obs, last_value = collect(policy, env, obs, cfg.chunks_per_rollout, sampler_cfg, gen, stats)
                st = ro.stacked()
                adv, ret = gae(st["rewards"], st["values"], st["dones"], last_value, cfg.ppo.gamma, cfg.ppo.lam)
            elif cfg.grpo_groups == "state":
                ro, obs, adv = collect_state_groups(policy, env, obs, cfg.chunks_per_rollout, cfg.group_size, sampler_cfg,
                                                    gen, stats)
                ret = None
            else:
                ro, ep_returns = collect_groups(policy, env, seed + 1000 * it, cfg.group_size, sampler_cfg, gen, stats)
                adv = group_advantages(ep_returns, cfg.group_size)[None].expand(len(ro), -1)
                ret = None
            t_roll = time.perf_counter() - t0
            terms = update(policy, ro, adv, ret, cfg.ppo, actor_opt, critic_opt, shuffle,
                           train_actor=it >= cfg.critic_warmup or critic_opt is None, bc=bc)
            chunks = int(torch.stack(ro.valid).sum())
            row = {
                "iteration": it + 1,
                "success_rate": float(np.mean(stats["success"])) if stats["success"] else float("nan"),
                "return": float(np.mean(stats["return"])) if stats["return"] else float("nan"),
                "episodes": len(stats["success"]),
                "env_steps_per_s": sum(stats["env_steps"]) / t_roll,
                "chunks_per_s": chunks / t_roll,
                "update_s": time.perf_counter() - t0 - t_roll,
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
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history
