"""An OpenVLA-style tokenised-action policy: a causal LM whose action dimensions are binned into
tokens, sampled and re-scored by the text adapter (`modalities/text/adapter.py`), not a copy.

Each decision is one prompt, the instruction followed by the binned proprioceptive state
(`<s0> .. <s{B-1}>`), and K x A sampled action tokens (`<a0> .. <a{B-1}>`, B uniform bins over
[-1, 1] as in OpenVLA).  A decision's tokens are a text rollout; objectives see the
Categorical step of every action token (`HiddenCategorical`, the text adapter's re-scoring).

A Gaussian teacher (e.g. the scripted expert) scores tokens through `BinnedGaussian`: the mass
of its Gaussian in each action bin (the end bins take the tails), and a floor `eps` for tokens
that are not action bins.  Sampled-token objectives (`opd`, the VLA-OPD form) and `hard_ce`
(the teacher's most likely bin) work across the two; analytic divergences between an LM head
and a binned Gaussian are not implemented.

The backbone is any `AutoModelForCausalLM` (a tiny random-init Llama here); camera images are
not tokenised (a VLM's image tower is future work), so the policy sees the instruction and state.

    python -m pytest tests/test_robot_tokenized.py -q -o addopts=""
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmdistill.interfaces import Rollout
from mmdistill.modalities.text.adapter import CausalLMAdapter
from mmdistill.modalities.text.config import TinyLMConfig
from mmdistill.modalities.text.hf import build_tiny_lm
from mmdistill.modalities.text.tokenizer import build_word_tokenizer
from mmdistill.stepdist import HiddenCategorical


def bin_centers(n_bins: int) -> Tensor:
    edges = torch.linspace(-1, 1, n_bins + 1)
    return (edges[:-1] + edges[1:]) / 2


def bin_index(x: Tensor, n_bins: int) -> Tensor:
    """The bin of each value in [-1, 1] (values outside fall in the end bins)."""
    return ((x.clamp(-1, 1) + 1) / 2 * n_bins).long().clamp(0, n_bins - 1)


class BinnedGaussian:
    """A Gaussian teacher seen through a tokeniser's action bins: `log_prob(tokens)` is the log of
    the Gaussian's mass in each token's bin, `mode()` the token of the most likely bin."""

    def __init__(
        self, mean_B_T: Tensor, std_B_T: Tensor, mask_B_T: Tensor, first_token: int, n_bins: int, eps: float = 1e-6
    ):
        self.mean_B_T, self.std_B_T, self.mask_B_T = mean_B_T, std_B_T, mask_B_T
        self.first_token, self.n_bins, self.eps = first_token, n_bins, eps

    def log_prob(self, tokens_B_T: Tensor) -> Tensor:
        k = tokens_B_T - self.first_token
        valid = (k >= 0) & (k < self.n_bins)
        k = k.clamp(0, self.n_bins - 1).to(self.mean_B_T.dtype)
        lo = torch.where(k == 0, torch.full_like(k, -math.inf), -1 + 2 * k / self.n_bins)
        hi = torch.where(k == self.n_bins - 1, torch.full_like(k, math.inf), -1 + 2 * (k + 1) / self.n_bins)
        normal = torch.distributions.Normal(self.mean_B_T, self.std_B_T)
        mass = normal.cdf(hi) - normal.cdf(lo)
        lp = torch.where(valid, (mass + self.eps).log(), torch.full_like(mass, self.eps).log())
        return lp * self.mask_B_T

    def mode(self) -> Tensor:
        return bin_index(self.mean_B_T, self.n_bins) + self.first_token


class TokenizedActionPolicy(nn.Module):
    """A causal LM acting through action tokens; `sample_chunk` / `step_dist` like flow heads."""

    kind = "tokenized_lm"

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        action_dim: int,
        chunk_size: int = 1,
        n_bins: int = 32,
        state_low: float = -1.0,
        state_high: float = 1.0,
        device: str = "cpu",
    ):
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.action_dim, self.chunk_size, self.n_bins = action_dim, chunk_size, n_bins
        self.state_low, self.state_high = state_low, state_high
        self.text = CausalLMAdapter(tokenizer, device=device)
        self.first_action = tokenizer.convert_tokens_to_ids("<a0>")
        missing = [
            t
            for t in (f"<a{n_bins - 1}>", f"<s{n_bins - 1}>")
            if tokenizer.convert_tokens_to_ids(t) == tokenizer.unk_token_id
        ]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the bin tokens {missing}; build it with action_tokenizer(words, n_bins={n_bins})"
            )
        self.config = {
            "kind": self.kind,
            "action_dim": action_dim,
            "chunk_size": chunk_size,
            "n_bins": n_bins,
            "state_low": state_low,
            "state_high": state_high,
        }

    # ------------------------------------------------------------------ prompts and actions

    def prompts(self, obs_N: Mapping[str, Any]) -> list[str]:
        state = obs_N["observation.state"]
        scaled = (state.float() - self.state_low) / (self.state_high - self.state_low) * 2 - 1
        bins = bin_index(scaled, self.n_bins).tolist()
        tasks = obs_N.get("task") or [""] * len(bins)
        return [f"{t} " + "".join(f"<s{b}>" for b in row) for t, row in zip(tasks, bins)]

    def decode(self, tokens_N_D: Tensor) -> Tensor:
        """Action tokens -> actions (bin centres); a token that is not an action bin acts as 0."""
        k = tokens_N_D - self.first_action
        centers = bin_centers(self.n_bins).to(tokens_N_D.device)
        valid = (k >= 0) & (k < self.n_bins)
        return torch.where(valid, centers[k.clamp(0, self.n_bins - 1)], torch.zeros_like(k, dtype=centers.dtype))

    @torch.no_grad()
    def sample_chunk(
        self, obs: Mapping[str, Any], generator: torch.Generator | None = None, noise_level: float = 1.0, **_: Any
    ) -> tuple[Tensor, Rollout]:
        """One decision per row: `(actions [N, K * A], the text rollout of its K * A action tokens)`;
        `noise_level` 0 is greedy decoding (evaluation)."""
        D = self.chunk_size * self.action_dim
        r = self.text.sample(
            self.lm,
            self.prompts(obs),
            max_new_tokens=D,
            temperature=1.0 if noise_level > 0 else 0.0,
            generator=generator,
        )
        if r.actions.shape[1] < D:  # every row ended early (EOS): pad, masked
            pad = D - r.actions.shape[1]
            r.actions = torch.cat(
                [r.actions, torch.full((len(r.actions), pad), self.text.pad_id, device=r.actions.device)], 1
            )
            r.mask_B_T = torch.cat([r.mask_B_T, r.mask_B_T.new_zeros(len(r.actions), pad)], 1)
            r.behavior_logp_B_T = torch.cat(
                [r.behavior_logp_B_T, r.behavior_logp_B_T.new_zeros(len(r.actions), pad)], 1
            )
        r.extras["token_bins"] = (self.first_action, self.n_bins)
        return self.decode(r.actions), r

    def step_dist(self, obs: Mapping[str, Any] | None, rollout: Rollout) -> HiddenCategorical:
        """The LM's Categorical at every action token of a decision (the text adapter's re-scoring)."""
        steps = {"prompt_ids": rollout.steps["prompt_ids"], "prompt_attn": rollout.steps["prompt_attn"]}
        return self.text.step_dist(
            self.lm, Rollout(rollout.context, steps, rollout.actions, rollout.mask_B_T, rollout.behavior_logp_B_T)
        )

    def dist(self, obs: Mapping[str, Any], mask_B_T: Tensor) -> Any:
        raise NotImplementedError(
            "a tokenised policy acts through sample_chunk and is scored per action token (step_dist)"
        )

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.lm.save_pretrained(out_dir / "lm")
        self.tokenizer.save_pretrained(out_dir / "lm")
        (out_dir / "config.json").write_text(json.dumps(self.config, indent=1))

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> TokenizedActionPolicy:
        conf = json.loads((Path(path) / "config.json").read_text())
        conf.pop("kind")
        lm = AutoModelForCausalLM.from_pretrained(Path(path) / "lm")
        return cls(lm, AutoTokenizer.from_pretrained(Path(path) / "lm"), device=device, **conf)


def action_tokenizer(words: list[str], n_bins: int) -> Any:
    """The offline word tokenizer plus `<a0..>` action and `<s0..>` state bin tokens (single tokens)."""
    tok = build_word_tokenizer(words)
    tok.add_tokens([f"<a{i}>" for i in range(n_bins)] + [f"<s{i}>" for i in range(n_bins)])
    return tok


def tiny_tokenized_policy(
    words: list[str],
    action_dim: int,
    chunk_size: int,
    n_bins: int = 32,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> TokenizedActionPolicy:
    """A random-init Llama over an offline tokenizer with action and state bin tokens."""
    tok = action_tokenizer(words, n_bins)
    lm = build_tiny_lm(
        TinyLMConfig(arch="llama", hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=4, seed=seed), tok
    )
    return TokenizedActionPolicy(lm.to(device), tok, action_dim, chunk_size, n_bins, device=device)
