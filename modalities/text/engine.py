"""Generation engines: the seam between the training loop and whatever samples completions.

An engine turns left-padded prompt ids into sampled completion tokens, the log-prob of
each token under the policy that produced it, and a mask of the steps that count.  The
adapter never calls `model.generate` itself, so a cluster can swap in a serving engine
(vLLM, SGLang) that implements the same one method, with the student's weights pushed to
it after each optimizer step (`sync_weights`).

`hf`: a lean KV-cache loop over any transformers causal LM (no logits processors).  It
can also sample from a per-token mixture of two policies -- the DAgger behaviour policy
`pi_i = beta * pi_T + (1 - beta) * pi_S`: at every step each row draws, with probability
`beta`, the teacher's token instead of the student's, both models advancing in lockstep.

    python -c "from mmdistill.modalities.text.engine import ENGINES; print(sorted(ENGINES))"
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.errors import ConfigError
from mmdistill.modalities.text.hf import unwrap


@dataclass
class Generation:
    """What an engine returns for B prompts and at most T new tokens."""

    tokens_B_T: Tensor  # sampled ids, pad after EOS
    logp_B_T: Tensor  # log-prob of each token under the policy that drew it (0 where masked)
    mask_B_T: Tensor  # 1.0 up to and including EOS
    from_teacher_B_T: Tensor | None = None  # mixture sampling: True where the teacher drew the token


class GenerationEngine(Protocol):
    def generate(
        self,
        model: Any,
        prompt_ids_B_P: Tensor,
        prompt_attn_B_P: Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        mixture: tuple[Any, float] | None = None,
    ) -> Generation: ...

    def sync_weights(self, model: Any) -> None: ...


def _cache_kw(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _get_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


class _Stepper:
    """One model decoding with its own KV cache."""

    def __init__(self, model: Any, ids_B_P: Tensor, attn_B_P: Tensor):
        self.model, self.kw = model, _cache_kw(model)
        self.device = next(model.parameters()).device
        pos = (attn_B_P.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids_B_P.to(self.device),
            attention_mask=attn_B_P.to(self.device),
            position_ids=pos.to(self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, self.logits = _get_cache(out), out.logits[:, -1]
        self.next_pos = pos[:, -1:].to(self.device) + 1

    def advance(self, tok_B: Tensor, attn_B_S: Tensor) -> None:
        out = self.model(
            input_ids=tok_B[:, None].to(self.device),
            attention_mask=attn_B_S.to(self.device),
            position_ids=self.next_pos,
            use_cache=True,
            **{self.kw: self.cache},
        )
        self.cache, self.logits = _get_cache(out), out.logits[:, -1]
        self.next_pos = self.next_pos + 1


class HFEngine:
    """KV-cache sampling with any transformers causal LM; temperature 0 is greedy."""

    def __init__(self, vocab_size: int, eos_id: int, pad_id: int):
        self.vocab_size, self.eos_id, self.pad_id = vocab_size, eos_id, pad_id

    def sync_weights(self, model: Any) -> None:  # the engine samples from the live model: nothing to push
        return None

    def _draw(self, logits_B_V: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        logits = logits_B_V[:, : self.vocab_size].float()
        if temperature > 0:
            logp_B_V = F.log_softmax(logits / temperature, dim=-1)
            tok_B = torch.multinomial(logp_B_V.exp(), 1, generator=generator).squeeze(-1)
        else:
            logp_B_V = F.log_softmax(logits, dim=-1)
            tok_B = logits.argmax(-1)
        return tok_B, logp_B_V.gather(-1, tok_B[:, None]).squeeze(-1)

    @torch.no_grad()
    def generate(
        self,
        model: Any,
        prompt_ids_B_P: Tensor,
        prompt_attn_B_P: Tensor,
        max_new_tokens: int,
        temperature: float,
        generator: torch.Generator | None,
        mixture: tuple[Any, float] | None = None,
    ) -> Generation:
        """Sample up to `max_new_tokens`; `mixture=(teacher, beta)` draws each token from the teacher with probability beta."""
        device = prompt_ids_B_P.device
        B = prompt_ids_B_P.shape[0]
        policies = [_Stepper(model, prompt_ids_B_P, prompt_attn_B_P)]
        if mixture is not None:
            teacher, beta = mixture
            if not 0.0 <= beta <= 1.0:
                raise ConfigError(f"mixture probability beta={beta} must lie in [0, 1]")
            policies.append(_Stepper(teacher, prompt_ids_B_P, prompt_attn_B_P))
        attn_B_S = prompt_attn_B_P
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, logps, alive, teacher_drew = [], [], [], []
        for _ in range(max_new_tokens):
            tok_B, lp_B = self._draw(policies[0].logits.to(device), temperature, generator)
            if mixture is not None:
                t_tok_B, t_lp_B = self._draw(policies[1].logits.to(device), temperature, generator)
                pick_B = torch.rand(B, generator=generator, device=device) < beta
                tok_B, lp_B = torch.where(pick_B, t_tok_B, tok_B), torch.where(pick_B, t_lp_B, lp_B)
                teacher_drew.append(pick_B & ~done_B)
            alive.append(~done_B)
            tok_B = torch.where(done_B, torch.full_like(tok_B, self.pad_id), tok_B)
            tokens.append(tok_B)
            logps.append(torch.where(done_B, torch.zeros_like(lp_B), lp_B))
            done_B = done_B | (tok_B == self.eos_id)
            if bool(done_B.all()):
                break
            attn_B_S = torch.cat([attn_B_S, (~done_B | (tok_B == self.eos_id)).long()[:, None]], dim=1)
            for p in policies:
                p.advance(tok_B, attn_B_S)
        return Generation(
            tokens_B_T=torch.stack(tokens, 1),
            logp_B_T=torch.stack(logps, 1),
            mask_B_T=torch.stack(alive, 1).float(),
            from_teacher_B_T=torch.stack(teacher_drew, 1) if mixture is not None else None,
        )


ENGINES: dict[str, type] = {"hf": HFEngine}


def build_engine(name: str, vocab_size: int, eos_id: int, pad_id: int) -> GenerationEngine:
    if name not in ENGINES:
        hint = (
            " (vLLM: implement GenerationEngine.generate/sync_weights over vllm.LLM and add it to ENGINES)"
            if name == "vllm"
            else ""
        )
        raise ConfigError(f"rollout.engine: unknown engine '{name}'; known: {sorted(ENGINES)}{hint}")
    return ENGINES[name](vocab_size=vocab_size, eos_id=eos_id, pad_id=pad_id)
