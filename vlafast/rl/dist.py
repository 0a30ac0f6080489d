"""Scale-out on Ray: rollout workers own slices of the vector env; learner ranks update.

Each ``RolloutWorker`` is a Ray actor holding envs [first, first + count) of the run's vector
env (built by the same factory as the in-process run) and a replica of the policy. Every
iteration the learner puts the trainable weights (actor, critic, noise head: the frozen VLM
never changes, so it is shipped once, at start) into the object store, each worker loads them
and collects its slice with ``rl.train.LocalCollector`` — the in-process code path, with the
seeds and env ids its envs have in the whole — and returns its rollout, advantages and critic
targets (all per env, so slices can be collected apart). ``pool_slices`` joins them into one
rollout and ``rl.train.update`` runs unchanged. With one worker the run is the in-process run:
same env seeds, same sampler noise (``stream_seed``), same samples in the same order.

Faults: a worker process that dies is restarted by Ray (``max_restarts``); its call is sent
again, the new process rebuilds its envs and replica from the start state, loads the current
weights and starts new episodes. The learner's checkpoint is written atomically after every
update (``train_rl``), so a learner restart resumes from the last one (``--resume``).

Learners: this process is rank 0; ``LearnerGroup`` adds ranks 1..L-1 as Ray actors in one
torch.distributed group (gloo on CPU, nccl on GPU) that split every minibatch and sum gradients.

Ray is an optional dependency (``vlafast[dist]``), imported only here and only when used.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from vlafast.envs.base import EnvSpec
from vlafast.rl.buffer import Rollout, pool_slices, tensors_to
from vlafast.policies import FlowPolicy
from vlafast.rl.train import (
    ALGORITHMS, LocalCollector, RLConfig, make_optimizers, new_stats, rl_sampler, stream_seed, update,
)

log = logging.getLogger(__name__)

UNAVAILABLE_WAIT_S = 300.0  # how long a call waits for a restarting worker before the run fails

EnvFactory = Callable[[int, int], Any]        # (first_env, num_envs) -> that slice of the run's VecEnv
PolicyFactory = Callable[[EnvSpec], FlowPolicy]  # env spec -> a policy of the run's architecture


@dataclasses.dataclass(frozen=True)
class DistConfig:
    workers: int = 2                 # rollout workers
    learners: int = 1                # data-parallel learner ranks (this process is rank 0; > 1: LearnerGroup)
    address: str | None = None       # None: start a local cluster on loopback (stopped at close);
                                     # "auto" or "ray://host:10001": join a running one
    max_restarts: int = 3            # per worker; one more death fails the run
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0     # > 0: the worker's replica samples on its GPU share

    def __post_init__(self):
        if self.workers < 1 or self.learners < 1:
            raise ValueError(f"workers and learners must be >= 1, got {self.workers}, {self.learners}")
        if self.max_restarts < 0 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("max_restarts and gpus_per_worker must be >= 0 and cpus_per_worker > 0, got "
                             f"{self.max_restarts}, {self.gpus_per_worker}, {self.cpus_per_worker}")

    def actor_options(self) -> dict[str, Any]:
        """Ray options of a rollout worker: its resources and restart policy (a call in flight
        when the worker dies is not retried by Ray: ``RayCollector`` re-sends it)."""
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker,
                "max_restarts": self.max_restarts, "max_task_retries": 0}


def import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the [dist] extra is installed by `make test`
        raise ImportError("the scale-out mode needs Ray: pip install 'vlafast[dist]'") from exc
    return ray


def split_envs(num_envs: int, workers: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[(first, count)] per worker: ``num_envs`` envs in contiguous slices as even as possible,
    each a multiple of ``multiple`` (GRPO's episode groups must not straddle workers)."""
    if num_envs % multiple:
        raise ValueError(f"num_envs ({num_envs}) must be a multiple of {multiple} (the GRPO group size)")
    units = num_envs // multiple
    if not 1 <= workers <= units:
        raise ValueError(f"{workers} workers cannot share {num_envs} envs"
                         + (f" in groups of {multiple}" if multiple > 1 else "") + f": use 1..{units} workers")
    sizes = [units // workers + (w < units % workers) for w in range(workers)]
    starts = [sum(sizes[:w]) for w in range(workers)]
    return [(s * multiple, n * multiple) for s, n in zip(starts, sizes)]


def trainable_names(policy: FlowPolicy) -> list[str]:
    """Names of the parameters RL changes (``policy.rl_parameters()``): all that is broadcast."""
    actor, critic = policy.rl_parameters()
    ids = {id(p) for p in actor + critic}
    return [n for n, p in policy.named_parameters() if id(p) in ids]


def trainable_state(policy: FlowPolicy, names: Sequence[str]) -> dict[str, Tensor]:
    params = dict(policy.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


def cpu_state(policy: FlowPolicy) -> dict[str, Tensor]:
    """The whole state dict on the CPU: what a replica starts from."""
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}


def replica(make_policy: PolicyFactory, spec: EnvSpec, state: dict[str, Tensor]) -> FlowPolicy:
    """Inside a Ray actor: a policy built by ``make_policy`` with ``state``, on the actor's GPU if
    it was given one."""
    device = torch.device("cuda" if import_ray().get_gpu_ids() else "cpu")
    policy = make_policy(spec).to(device)
    policy.load_state_dict(state)
    return policy


def end_actors(actors: Sequence[Any], what: str) -> None:
    """Call each actor's ``close`` (a dead one has nothing left to close), then kill it."""
    ray = import_ray()
    for actor in actors:
        try:
            ray.get(actor.close.remote(), timeout=30)
        except Exception as exc:
            log.debug("%s close: %s", what, exc)
        ray.kill(actor, no_restart=True)


def rollout_to_cpu(ro: Rollout) -> Rollout:
    """The rollout with its batches and traces on the CPU (for the object store)."""
    return dataclasses.replace(ro, batches=[tensors_to(b, "cpu") for b in ro.batches],
                               traces=[tensors_to(t, "cpu") for t in ro.traces])


def ensure_cluster(dist: DistConfig) -> bool:
    """Connect to Ray unless connected: join ``dist.address``, or start a private single-node
    cluster on loopback (CPUs are logical slots: at least one per worker). True if started here."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if dist.address is None:
        actors = dist.workers + dist.learners - 1
        cpus = max(os.cpu_count() or 1, math.ceil(actors * dist.cpus_per_worker) + 1)
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=512 * 2**20, logging_level=logging.WARNING)
        return True
    ray.init(address=dist.address, logging_level=logging.WARNING)
    return False


def missing_resources(actors: int, cpus_each: float, gpus_each: float) -> str:
    """'' if the cluster has room left for ``actors`` actors of these sizes, else what is short
    (an actor that cannot be placed would wait for resources forever)."""
    have = import_ray().available_resources()
    need = {"CPU": actors * cpus_each, "GPU": actors * gpus_each}
    return ", ".join(f"{k} needed {v:g}, {have.get(k, 0.0):g} free"
                     for k, v in need.items() if v > have.get(k, 0.0) + 1e-9)


class RolloutWorker:
    """A Ray actor (see ``RayCollector``): envs [first_env, first_env + num_envs) and a replica."""

    def __init__(self, make_env: EnvFactory, make_policy: PolicyFactory, state: dict[str, Tensor], cfg: RLConfig,
                 seed: int, index: int, first_env: int, num_envs: int):
        ray = import_ray()
        self.env = make_env(first_env, num_envs)
        self.policy = replica(make_policy, self.env.spec, state)
        self.policy.use_cuda_graphs(self.policy.device.type == "cuda")
        self.cfg, self.seed, self.index, self.first_env = cfg, seed, index, first_env
        self.collector: LocalCollector | None = None
        with warnings.catch_warnings():  # Ray 2.5x deprecates an attribute its own property reads
            warnings.simplefilter("ignore", DeprecationWarning)
            self.fresh_restart = ray.get_runtime_context().was_current_actor_reconstructed

    def load(self, weights: dict[str, Tensor]) -> float:
        """Copy the learner's trainable weights in; returns the seconds it took."""
        t0 = time.perf_counter()
        params = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)
        return time.perf_counter() - t0

    def collect(self, weights: dict[str, Tensor], iteration: int) -> dict[str, Any]:
        """Load ``weights``, collect this slice's rollout for ``iteration`` (on the CPU for the
        trip back). A new process starts its envs and noise stream at this iteration."""
        load_s = self.load(weights)
        if self.collector is None:
            gen = torch.Generator(device=self.policy.device).manual_seed(stream_seed(self.seed, self.index, iteration))
            self.collector = LocalCollector(self.env, self.cfg, self.seed, gen, self.first_env)
        stats = new_stats()
        t0 = time.perf_counter()
        ro, adv, ret, _ = self.collector.collect(self.policy, iteration, stats)
        restarted, self.fresh_restart = self.fresh_restart, False
        return {"rollout": rollout_to_cpu(ro), "adv": adv.cpu(), "ret": None if ret is None else ret.cpu(), "stats": stats,
                "load_s": load_s, "collect_s": time.perf_counter() - t0, "restarted": restarted}

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.env.close()


class RayCollector:
    """Rollouts from ``dist.workers`` Ray actors (``train_rl(..., collector=...)``).

    ``make_env(first_env, num_envs)`` (envs [first_env, first_env + num_envs) of the run's vector
    env) and ``make_policy(spec)`` must be picklable (e.g. ``functools.partial`` of the recipe's
    ``env_slice`` and ``build_policy``): each worker calls them in its own process. ``policy`` is the
    learner's; its whole state is the workers' start state. ``num_envs`` is the size of the
    vector env the workers split. Use as a context manager or call ``close()``.
    """

    def __init__(self, policy: FlowPolicy, make_env: EnvFactory, make_policy: PolicyFactory, cfg: RLConfig,
                 dist: DistConfig, *, seed: int, num_envs: int):
        ray = self._ray = import_ray()
        self.cfg, self.dist = cfg, dist
        self._owns_cluster = ensure_cluster(dist)
        short = missing_resources(dist.workers, dist.cpus_per_worker, dist.gpus_per_worker)
        if short:
            self.close()
            raise RuntimeError(f"the Ray cluster cannot place the rollout workers: {short} (fewer --workers, or a "
                               "bigger cluster)")
        group = cfg.group_size if cfg.algo == "grpo" and cfg.grpo_groups == "episode" else 1
        self.slices = split_envs(num_envs, dist.workers, group)
        self.names = trainable_names(policy)
        # Kept alive here: Ray re-runs a worker's constructor from it when the worker restarts.
        self._state = ray.put(cpu_state(policy))
        actor = ray.remote(RolloutWorker).options(**dist.actor_options())
        self.workers = [actor.remote(make_env, make_policy, self._state, cfg, seed, i, first, count)
                        for i, (first, count) in enumerate(self.slices)]
        self.restarts = [0] * dist.workers
        ray.get([w.pid.remote() for w in self.workers])  # started (raises here if a constructor fails)

    def __enter__(self) -> "RayCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def broadcast(self, policy: FlowPolicy):
        """The trainable weights in the object store (one copy, fetched by every worker)."""
        return self._ray.put(trainable_state(policy, self.names))

    def sync(self, policy: FlowPolicy) -> float:
        """Put the weights and have every worker load them; the seconds it took (the per-update
        weight-sync cost the benchmark reports)."""
        t0 = time.perf_counter()
        ref = self.broadcast(policy)
        self._ray.get([w.load.remote(ref) for w in self.workers])
        return time.perf_counter() - t0

    def collect(self, policy: FlowPolicy, iteration: int, stats: dict[str, list]
                ) -> tuple[Rollout, Tensor, Tensor | None, dict[str, float]]:
        weights = self.broadcast(policy)
        replies = self._call_all(lambda w: w.collect.remote(weights, iteration))
        for i, r in enumerate(replies):
            if r["restarted"]:
                self.restarts[i] += 1
            for key, values in r["stats"].items():
                stats[key] += values
        ro, adv, ret = pool_slices([(r["rollout"], r["adv"], r["ret"]) for r in replies], policy.device,
                                   rl_sampler(policy, self.cfg))
        info = {"workers": float(len(self.workers)), "worker_restarts": float(sum(self.restarts)),
                "weight_load_s": max(r["load_s"] for r in replies),
                "worker_collect_s": max(r["collect_s"] for r in replies)}
        return ro, adv, ret, info

    def _call_all(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call(worker)`` on every worker, in parallel. A call lost with its worker is sent
        again: at once after a death (at most ``max_restarts`` per call), after a short wait
        while Ray reports the worker restarting (up to ``UNAVAILABLE_WAIT_S``)."""
        ray = self._ray
        refs = [call(w) for w in self.workers]
        out: list[Any] = [None] * len(refs)
        for i in range(len(refs)):
            deaths, deadline = 0, time.monotonic() + UNAVAILABLE_WAIT_S
            while True:
                try:
                    out[i] = ray.get(refs[i])
                    break
                except ray.exceptions.ActorUnavailableError as exc:  # restarting, or a network blip
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rollout worker {i} unavailable for {UNAVAILABLE_WAIT_S:.0f} s") from exc
                    log.info("rollout worker %d unavailable (restarting?): call sent again", i)
                    time.sleep(0.5)
                except ray.exceptions.RayActorError as exc:
                    deaths += 1
                    if deaths > self.dist.max_restarts:
                        raise RuntimeError(f"rollout worker {i} (envs {self.slices[i]}) died {deaths} times in one "
                                           f"call: giving up (max_restarts={self.dist.max_restarts})") from exc
                    log.warning("rollout worker %d died (%s): Ray restarts it; its envs start new episodes",
                                i, type(exc).__name__)
                refs[i] = call(self.workers[i])
        return out

    def pids(self) -> list[int]:
        return self._ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        """Close the workers' envs, end the workers, and stop the cluster if this started it."""
        end_actors(getattr(self, "workers", []), "rollout worker")
        self.workers = []
        if self._owns_cluster:
            self._ray.shutdown()
            self._owns_cluster = False


# ---------------------------------------------------------------------------------------------
# data-parallel learners


class TorchGradSync:
    """``rl.train.GradSync`` over the default torch.distributed group (gloo on CPU, nccl on GPU):
    gradients and logged sums are added up over the ranks."""

    def __init__(self):
        import torch.distributed as tdist

        self._dist = tdist
        self.rank, self.world = tdist.get_rank(), tdist.get_world_size()

    def sum_grads(self, params: list[Tensor]) -> None:
        """grad <- sum over ranks, in one flat all-reduce. A parameter no rank has a gradient for
        keeps ``grad = None`` (AdamW then skips it, as a single learner would)."""
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=flat.device)
        self._dist.all_reduce(flat)
        self._dist.all_reduce(has)
        offset = 0
        for p, seen in zip(params, has.tolist()):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if seen else None
            offset += n

    def sum_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self._dist.get_backend() == "nccl":
            t = t.cuda()
        self._dist.all_reduce(t)
        return t.tolist()

    def sum_terms(self, sums: dict[str, float], counts: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
        """Logged loss terms (sample-weighted sums and their counts) added up over the ranks;
        a term some rank did not log (bc_loss, an empty share) counts as 0 there."""
        every: list[Any] = [None] * self.world
        self._dist.all_gather_object(every, sorted(sums))
        names = sorted(set().union(*every))
        totals = self.sum_floats([sums.get(k, 0.0) for k in names] + [float(counts.get(k, 0)) for k in names])
        return dict(zip(names, totals[:len(names)])), dict(zip(names, totals[len(names):]))


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LearnerRank:
    """A Ray actor: learner rank ``rank`` of ``world`` (rank 0 is the driver's ``train_rl``), a
    policy replica and its optimisers, started from rank 0's state."""

    def __init__(self, make_policy: PolicyFactory, spec: EnvSpec, state: dict[str, Tensor], optim: dict[str, Any],
                 cfg: RLConfig, rank: int, world: int, init_method: str, backend: str):
        import torch.distributed as tdist

        self.policy = replica(make_policy, spec, state)
        self.cfg = cfg
        self.actor_opt, self.critic_opt = make_optimizers(self.policy, cfg)
        self.actor_opt.load_state_dict(optim["actor"])
        if self.critic_opt is not None:
            self.critic_opt.load_state_dict(optim["critic"])
        tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        self.sync = TorchGradSync()

    def update(self, data: tuple[Rollout, Tensor, Tensor | None], shuffle_state: Tensor, train_actor: bool) -> None:
        """Rank ``rank``'s part of rank 0's update: ``data`` = (rollout, advantages, returns)."""
        ro, advantages, returns = data
        dev = self.policy.device
        ro = dataclasses.replace(ro, batches=[tensors_to(b, dev) for b in ro.batches],
                                 traces=[tensors_to(t, dev, config=rl_sampler(self.policy, self.cfg)) for t in ro.traces])
        shuffle = torch.Generator()
        shuffle.set_state(shuffle_state)
        update(self.policy, ro, advantages, returns, self.cfg.ppo, self.actor_opt, self.critic_opt, shuffle,
               train_actor=train_actor, sync=self.sync, loss=ALGORITHMS[self.cfg.algo].loss)

    def trainable(self, names: list[str]) -> dict[str, Tensor]:
        return trainable_state(self.policy, names)

    def close(self) -> None:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


class LearnerGroup:
    """``dist.learners`` data-parallel learner ranks for ``train_rl(..., learners=...)``: this process
    is rank 0, ranks 1.. are Ray actors (one GPU each on a GPU learner). Every rank holds the
    whole rollout and takes its share of each minibatch; gradients are summed before the step
    (``rl.train.update``), so the ranks stay identical and one of them (this one) checkpoints.
    torch.distributed runs gloo on CPU, nccl on GPU. A rank that dies ends the run; ``--resume``
    continues from the last checkpoint."""

    def __init__(self, make_policy: PolicyFactory, cfg: RLConfig, dist: DistConfig):
        if dist.learners < 2:
            raise ValueError(f"a LearnerGroup has >= 2 learners (1 is the plain in-process update), got {dist.learners}")
        self.make_policy, self.cfg, self.dist, self.learners = make_policy, cfg, dist, dist.learners
        self.ranks: list[Any] = []
        self._owns_cluster = False

    def start(self, policy: FlowPolicy, actor_opt: torch.optim.Optimizer,
              critic_opt: torch.optim.Optimizer | None) -> None:
        import torch.distributed as tdist

        ray = import_ray()
        self._owns_cluster = ensure_cluster(self.dist)
        if tdist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        gpu = policy.device.type == "cuda"
        short = missing_resources(self.learners - 1, self.dist.cpus_per_worker, 1.0 if gpu else 0.0)
        if short:
            raise RuntimeError(f"the Ray cluster cannot place learner ranks 1..{self.learners - 1}: {short}")
        host = "127.0.0.1" if self.dist.address is None else ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{_free_port(host)}"
        backend = "nccl" if gpu else "gloo"
        state = ray.put(cpu_state(policy))
        optim = ray.put({"actor": actor_opt.state_dict(), "critic": critic_opt.state_dict() if critic_opt else None})
        actor = ray.remote(LearnerRank).options(num_cpus=self.dist.cpus_per_worker, num_gpus=1 if gpu else 0)
        self.ranks = [actor.remote(self.make_policy, policy.env_spec, state, optim, self.cfg, r, self.learners,
                                   init_method, backend) for r in range(1, self.learners)]
        tdist.init_process_group(backend, init_method=init_method, rank=0, world_size=self.learners)
        self.sync = TorchGradSync()

    def update(self, policy: FlowPolicy, ro: Rollout, advantages: Tensor, returns: Tensor | None, cfg, actor_opt,
               critic_opt, shuffle: torch.Generator, train_actor: bool = True, **kwargs: Any) -> dict[str, float]:
        ray = import_ray()
        shared = ray.put((rollout_to_cpu(ro), advantages.cpu(), None if returns is None else returns.cpu()))
        state = shuffle.get_state()
        refs = [r.update.remote(shared, state, train_actor) for r in self.ranks]
        out = update(policy, ro, advantages, returns, cfg, actor_opt, critic_opt, shuffle, train_actor=train_actor,
                     sync=self.sync, **kwargs)
        ray.get(refs)
        return out

    def replica_weights(self, rank: int, names: list[str]) -> dict[str, Tensor]:
        """Rank ``rank``'s trainable weights (tests: the replicas stay identical)."""
        return import_ray().get(self.ranks[rank - 1].trainable.remote(names))

    def close(self) -> None:
        import torch.distributed as tdist

        end_actors(self.ranks, "learner rank")
        self.ranks = []
        if tdist.is_initialized():
            tdist.destroy_process_group()
        if self._owns_cluster:
            import_ray().shutdown()
            self._owns_cluster = False
