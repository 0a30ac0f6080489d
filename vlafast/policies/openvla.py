"""``OpenVLAChunkPolicy``: OpenVLA as a policy for eval, steering, RL and the robot loop.

OpenVLA decodes one action (7 tokens, greedy) per observation from the first camera; the
chunk it returns is that one action, [B, 1, A_env], in the dataset's units (q01 / q99
unnormalisation of the ``unnorm_key`` statistics). OpenVLA decodes without padding, so the
rows of a batch are decoded in groups of equal prompt length.

RL (PPO / GRPO on token log-probs, as RLinf and SimpleVLA-RL train OpenVLA; the contract is
``policies.tokens``): ``act`` samples the 7 action tokens with a ``TokenSampler`` and
``evaluate`` recomputes their log-probs by teacher forcing. Both draw from, and score under,
the distribution restricted to the 256 action-bin tokens (ids ``32000 - 256 .. 31999``): the
logits of every other token are dropped before the softmax, so every sampled token decodes to
an action and the log-probs are those of that restricted distribution, the same in ``act`` and
``evaluate``. (Greedy decoding, ``act_obs``, still takes the argmax over the whole vocabulary,
as OpenVLA does.) The critic reads the mean of the LLM's last hidden states over the prefix
(image patches + prompt) and the raw env state. What RL trains: the language model (its
embeddings, layers and head) and the critic; the vision towers and the projector stay frozen.
RLinf trains LoRA adapters of the 7B instead; a full-LLM update is what fits the tiny models
here (on the 7B it needs an optimiser state of several times its 14 GB of bf16 weights).

Axes: B batch, L prompt tokens, P0 prefix length (BOS + patches + rest of the prompt), N action
tokens (= A, the model's action dim), K action bins, D LLM width, S env state dim.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vlafast.envs.base import EnvSpec, Obs
from vlafast.policies.base import PolicyError
from vlafast.policies.processors import OpenVLAProcessor
from vlafast.policies.spec import EnvBinding, PolicySpec
from vlafast.policies.tokens import StepScored, TokenSampler, TokenTrace, masked_steps, token_log_probs


@dataclasses.dataclass
class OpenVLABatch:
    """Model-ready observations for OpenVLA: pixel_values [B, 6, H, W], prompt_ids [B, L] (BOS
    first, ending with the empty token 29871, right-padded with 0 to the longest prompt),
    prompt_len [B] long, state [B, S] raw (the critic's input)."""

    pixel_values: Tensor
    prompt_ids: Tensor
    prompt_len: Tensor
    state: Tensor

    @property
    def size(self) -> int:
        return self.pixel_values.shape[0]

    def index(self, idx: Tensor) -> "OpenVLABatch":
        b = OpenVLABatch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))
        longest = int(b.prompt_len.max()) if b.size else 1
        return dataclasses.replace(b, prompt_ids=b.prompt_ids[:, :longest])

    @staticmethod
    def cat(batches: Sequence["OpenVLABatch"]) -> "OpenVLABatch":
        """Concatenate along B; prompts are right-padded to the longest."""
        L = max(b.prompt_ids.shape[1] for b in batches)
        ids = [torch.nn.functional.pad(b.prompt_ids, (0, L - b.prompt_ids.shape[1])) for b in batches]
        return OpenVLABatch(torch.cat([b.pixel_values for b in batches]), torch.cat(ids),
                            torch.cat([b.prompt_len for b in batches]), torch.cat([b.state for b in batches]))

    def groups(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(rows [b], pixel_values [b, 6, H, W], prompt_ids [b, L_g]) for each prompt length L_g:
        OpenVLA runs unpadded, so rows of one length run together."""
        out = []
        for length in sorted(set(self.prompt_len.tolist())):
            rows = torch.nonzero(self.prompt_len == length).squeeze(1)
            out.append((rows, self.pixel_values[rows], self.prompt_ids[rows, :length]))
        return out


@dataclasses.dataclass
class _LayerCaches:
    """A KV cache with one tensor per layer (what ``LlamaLM.forward`` reads of a ``KVCache``:
    ``k[i]``, ``v[i]``, ``max_len``). The teacher-forced pass backpropagates through every
    layer's attention; with one [L, ...] tensor, the next layer's write would invalidate the
    keys the previous layer saved for its backward."""

    k: list[Tensor]
    v: list[Tensor]
    max_len: int

    @classmethod
    def empty(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> "_LayerCaches":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.depth)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.depth)], max_len)


class OpenVLAChunkPolicy(StepScored, nn.Module):
    def __init__(self, model, processor: OpenVLAProcessor, spec: PolicySpec, *, unnorm_key: str | None = None):
        super().__init__()
        self.model, self.processor, self._spec = model, processor, spec
        self.unnorm_key = unnorm_key
        self.critic: nn.Module | None = None
        self.model.action_stats(unnorm_key)  # fails now, with the keys there are, when the key is wrong
        if spec.env is not None:
            self._check_binding(spec.env)

    @property
    def spec(self) -> PolicySpec:
        return self._spec

    @property
    def exec_horizon(self) -> int:
        return 1

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def env_spec(self) -> EnvBinding:
        if self._spec.env is None:
            raise PolicyError("this policy is not bound to an environment yet: call policy.bind(env.spec)")
        return self._spec.env

    def _check_binding(self, env: EnvBinding) -> None:
        if env.action_dim > self.model.cfg.action_dim:
            raise PolicyError(f"the env has {env.action_dim} action dims but OpenVLA decodes {self.model.cfg.action_dim}")
        if not env.cameras:
            raise PolicyError("OpenVLA needs a camera image; this env has none")

    def bind(self, env: EnvSpec | EnvBinding, **_) -> "OpenVLAChunkPolicy":
        binding = env if isinstance(env, EnvBinding) else EnvBinding.of(env)
        self._check_binding(binding)
        if self._spec.env is not None and self.critic is not None and binding.state_dim != self._spec.env.state_dim:
            raise PolicyError(f"the value head reads a {self._spec.env.state_dim}-dim state; this env's has "
                              f"{binding.state_dim}")
        self._spec = dataclasses.replace(self._spec, env=binding)
        return self

    @torch.no_grad()
    def act_obs(self, obs: Obs, *, generator: torch.Generator | None = None, num_steps: int | None = None) -> np.ndarray:
        """Env actions [B, 1, A_env]: one greedy action per env (``generator`` is unused: greedy)."""
        env = self.env_spec
        pixels = self.processor.pixel_values(obs, env.cameras[0])
        prompts = [self.processor.prompt_ids(t) for t in obs["instruction"]]
        out = np.zeros((len(prompts), 1, env.action_dim))
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
            actions = self.model.predict_action(pixels[rows], ids, self.unnorm_key)  # [b, A]
            out[rows, 0] = actions[:, : env.action_dim].double().cpu().numpy()
        return out

    # -- RL: sampled action tokens and their log-probs (policies.tokens) ------------------------

    @property
    def first_action_token(self) -> int:
        """The smallest action-bin token id (bins take ids first .. first + K - 1)."""
        return self.model.action_tokenizer.first_token

    def observe(self, obs: Obs) -> OpenVLABatch:
        """Env observation -> model inputs on the policy's device (the prompt ends with the empty
        token, as ``predict_action`` completes it)."""
        from vlafast.models.openvla import EMPTY_TOKEN

        pixels = self.processor.pixel_values(obs, self.env_spec.cameras[0])
        prompts = [self.processor.prompt_ids(t) for t in obs["instruction"]]
        prompts = [p if p[-1:] == [EMPTY_TOKEN] else p + [EMPTY_TOKEN] for p in prompts]
        ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        state = torch.from_numpy(np.asarray(obs["state"], np.float32))
        dev = self.device
        return OpenVLABatch(pixels, ids.to(dev), torch.tensor([len(p) for p in prompts], device=dev), state.to(dev))

    def _forward(self, pixel_values: Tensor, ids: Tensor, tokens: Tensor | None, cache) -> tuple[Tensor, Tensor]:
        """The LLM over [prefix, tokens] (one prompt length) -> (final-normed hidden states
        [b, P0 + n, D], the action-bin logits [b, n + 1, K] in fp32 at the prefix's last
        position and after each token: position j scores action token j)."""
        lm = self.model.language_model
        x = self.model.embed_prefix(pixel_values, ids)
        start = x.shape[1] - 1
        if tokens is not None:
            x = torch.cat([x, lm.embed(tokens)], dim=1)
        h = lm(x, torch.arange(x.shape[1], device=x.device), cache)
        return h, self._bin_logits(h[:, start:])

    def _bin_logits(self, h: Tensor) -> Tensor:
        """Final-normed hidden states [b, n, D] -> logits of the action-bin tokens [b, n, K] fp32
        (the head's rows of those tokens only)."""
        first = self.first_action_token
        return (h @ self.model.lm_head.weight[first: first + self.model.cfg.n_bins].T).float()

    def _new_cache(self, batch: int, max_len: int) -> _LayerCaches:
        return _LayerCaches.empty(self.model.cfg.llm, batch, max_len, self.model.dtype, self.device)

    @staticmethod
    def _prefix_features(h: Tensor, prefix_len: int) -> Tensor:
        """[b, D] fp32: the mean last hidden state over the prefix (the critic's features)."""
        return h[:, :prefix_len].detach().float().mean(1)

    @torch.no_grad()
    def act(self, batch: OpenVLABatch, config: TokenSampler, generator: torch.Generator | None = None
            ) -> tuple[np.ndarray, TokenTrace, Tensor]:
        """Sample one action per env -> (env actions [B, 1, A_env] numpy, trace, value [B]).

        Tokens are decoded one at a time through a KV cache, each drawn from the action-bin
        distribution at ``config.temperature`` (module docstring)."""
        if not isinstance(config, TokenSampler):
            raise PolicyError(f"OpenVLA samples action tokens: act needs a TokenSampler, got {type(config).__name__}")
        B, N = batch.size, self.model.cfg.action_dim
        lm = self.model.language_model
        tokens = torch.zeros(B, N, dtype=torch.long, device=self.device)
        step_lp = torch.zeros(B, N, device=self.device)
        step_ent = torch.zeros(B, N, device=self.device)
        feats = torch.zeros(B, self.model.cfg.llm.width, device=self.device)
        for rows, pixels, ids in batch.groups():
            b = len(rows)
            prefix_len = self.model.prefix_len(ids.shape[1])
            cache = self._new_cache(b, prefix_len + N - 1)
            h, logits = self._forward(pixels, ids, None, cache)  # logits [b, 1, K]
            feats[rows] = self._prefix_features(h, prefix_len)
            for n in range(N):
                probs = torch.softmax(logits[:, -1] / config.temperature, dim=-1)
                k = torch.multinomial(probs, 1, generator=generator)  # [b, 1] bin index
                lp, ent = token_log_probs(logits[:, -1:], k, config.temperature)
                tokens[rows, n] = k[:, 0] + self.first_action_token
                step_lp[rows, n], step_ent[rows, n] = lp[:, 0], ent[:, 0]
                if n + 1 < N:
                    x = lm.embed(tokens[rows, n: n + 1])
                    logits = self._bin_logits(lm(x, torch.tensor([prefix_len + n], device=self.device), cache))
        trace = TokenTrace.of(config, tokens, torch.ones_like(tokens, dtype=torch.bool), step_lp, step_ent)
        return self.to_env(tokens), trace, self._value_of(feats, batch.state)

    def to_env(self, tokens: Tensor) -> np.ndarray:
        """Action tokens [B, N] -> env actions [B, 1, A_env] numpy (bin centres, unnormalised)."""
        stats = self.model.action_stats(self.unnorm_key)
        actions = stats.unnormalize(self.model.action_tokenizer.decode(tokens))
        return actions[:, None, : self.env_spec.action_dim].double().cpu().numpy()

    def evaluate_steps(self, batch: OpenVLABatch, trace: TokenTrace) -> tuple[Tensor, Tensor, Tensor]:
        """(step log-probs [B, N], step entropies [B, N], value [B]) of the stored tokens under the
        current parameters: one teacher-forced pass per prompt length (0 where not valid)."""
        B, N = trace.tokens.shape
        step_lp = torch.zeros(B, N, device=self.device)
        step_ent = torch.zeros(B, N, device=self.device)
        feats = torch.zeros(B, self.model.cfg.llm.width, device=self.device)
        tokens = trace.tokens.to(self.device)
        for rows, pixels, ids in batch.groups():
            prefix_len = self.model.prefix_len(ids.shape[1])
            cache = self._new_cache(len(rows), prefix_len + N - 1)
            h, logits = self._forward(pixels, ids, tokens[rows, :-1], cache)  # logits [b, N, K]
            lp, ent = token_log_probs(logits, tokens[rows] - self.first_action_token, trace.config.temperature)
            step_lp = step_lp.index_put((rows,), lp)
            step_ent = step_ent.index_put((rows,), ent)
            feats[rows] = self._prefix_features(h, prefix_len)
        return (*masked_steps(step_lp, step_ent, trace.valid), self._value_of(feats, batch.state))

    def value(self, batch: OpenVLABatch) -> Tensor:
        """Critic [B] of an observation batch: the mean last hidden state over each row's prefix
        (image + prompt) and the raw state; zeros when the policy has no value head (evaluation)."""
        if self.critic is None:
            return torch.zeros(batch.size, device=self.device)
        feats = torch.zeros(batch.size, self.model.cfg.llm.width, device=self.device)
        with torch.no_grad():
            for rows, pixels, ids in batch.groups():
                prefix_len = self.model.prefix_len(ids.shape[1])
                h, _ = self._forward(pixels, ids, None, self._new_cache(len(rows), prefix_len))
                feats[rows] = self._prefix_features(h, prefix_len)
        return self._value_of(feats, batch.state)

    def _value_of(self, feats: Tensor, state: Tensor) -> Tensor:
        if self.critic is None:
            return torch.zeros(state.shape[0], device=self.device)
        return self.critic(torch.cat([feats.float(), state.float()], dim=-1)).squeeze(-1)

    def attach_value_head(self) -> nn.Module:
        """The critic (built once; drawn from torch's global RNG)."""
        if self.critic is None:
            from vlafast.policies.flow import value_head

            self.critic = value_head(self.model.cfg.llm.width, self.env_spec.state_dim).to(self.device)
        return self.critic

    def rl_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor, critic) parameters for RL: the language model; the vision towers and the
        projector stay frozen. Attaches the value head if there is none."""
        return list(self.model.language_model.parameters()), list(self.attach_value_head().parameters())

    # -- steering surface --------------------------------------------------------------------

    def mlps(self):
        return self.model.mlps()

    def action_layers(self) -> list[str]:
        """Every LLM layer feeds the action tokens."""
        return [name for name, _ in self.model.mlps()]


def save_openvla(policy: OpenVLAChunkPolicy, folder: str | Path) -> Path:
    """Write ``policy`` as a Hugging Face OpenVLA folder that ``policies.load`` reads back:
    ``model.safetensors`` (the model's weights under their published names), ``config.json``
    (the source checkpoint's, when it was loaded from one, with ``vlafast_config`` giving the
    exact sizes), ``dataset_statistics.json`` with the statistics the policy acts with (its
    ``unnorm_key``'s only: an RL result is trained for that env) and the tokenizer. The critic
    is not part of OpenVLA's layout and is not written."""
    from safetensors.torch import save_file

    from vlafast._io import atomic_path, atomic_write_text

    tok = policy.tokenizer
    if tok.hf is None and tok.path is None:
        raise PolicyError("save needs the policy's tokenizer as a file or a tokenizers.Tokenizer")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = policy.model
    source = Path(policy.spec.source.removeprefix("openvla:")) if policy.spec.source.startswith("openvla:") else None
    meta = {}
    if source is not None and (source / "config.json").is_file():
        meta = json.loads((source / "config.json").read_text())
    meta.pop("norm_stats", None)  # the statistics are dataset_statistics.json's
    meta.update({"model_type": meta.get("model_type", "openvla"),
                 "vision_backbone_id": meta.get("vision_backbone_id", "dinosiglip-vit-so-224px"),
                 "n_action_bins": model.cfg.n_bins, "pad_to_multiple_of": model.cfg.pad_to_multiple_of,
                 "vlafast_config": model.cfg.to_json()})
    stats = model.action_stats(policy.unnorm_key)
    key = policy.unnorm_key or next(iter(model.stats))
    statistics = {key: {"action": {"q01": stats.q01.tolist(), "q99": stats.q99.tolist(), "mask": stats.mask.tolist()}}}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=1) + "\n")
    atomic_write_text(folder / "dataset_statistics.json", json.dumps(statistics, indent=1) + "\n")
    if tok.hf is not None:
        with atomic_path(folder / "tokenizer.json") as tmp:
            tok.hf.save(str(tmp))
    else:
        shutil.copyfile(tok.path, folder / tok.path.name)
    return folder


__all__ = ["OpenVLABatch", "OpenVLAChunkPolicy", "save_openvla"]
