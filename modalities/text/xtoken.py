"""The `cross_tokenizer` teacher kind: a teacher with its own tokenizer, scoring the student's rollouts
in the student's vocabulary (X-Token, arXiv 2605.21699; docs/objectives.md section 8.12; the
projection math is in `xtoken_projection.py`).  The ordinary `reverse_kl` / `jsd` objectives score the student
against the `TopKCategorical` it yields; the objective does not know the teacher is projected.

`models.NAME: {kind: cross_tokenizer, path: CKPT}` loads a causal LM checkpoint with the tokenizer
saved beside it.  For every student rollout the teacher:
  1. decodes prompt and completion to text: the question formatted as the teacher was trained
     (its own chat template if its tokenizer has one, else `adapter.format_prompt`), followed by
     the completion tokens' strings (special tokens such as EOS add no text);
  2. re-tokenises that text with its own tokenizer and runs once over it;
  3. aligns by character offsets: student completion step t, which predicts the token starting
     at character c, reads the teacher's next-token distribution after the last teacher token
     that ends at or before c.  When a teacher token ends exactly at c the two states see the
     same text (`exact_B_T`); otherwise (a teacher token straddles c, e.g. a byte-level " 12"
     over a student "1") the nearest boundary before c is used, a state that lacks the text
     between that boundary and c;
  4. projects that distribution through the sparse W onto the student's vocabulary; where the
     student's token spans several teacher tokens with both ends on teacher boundaries (a word
     "####" over four characters "#"), that token gets the teacher's exact probability of the
     span, read from the same pass (`move_span_mass`);
  5. keeps the top-k plus a tail bucket (`TopKCategorical`, what `HiddenCategorical.divergence`
     takes), `chunk_size` rows at a time, so `B x T x V_teacher` logits never exist.
`models.NAME.options`: `topk` (256, capped at the student's vocabulary: exact for small ones) and
`smoothing` (1e-4, the uniform floor of the projected distribution); see `CrossTokenizerOptions`.
Token strings come from decoding each id after an anchor token ("a"), so metaspace tokenizers
keep their leading spaces; tokens that are partial UTF-8 bytes decode to replacement characters
and align only approximately.

    python -m pytest tests/test_xtoken.py -q
    mmdistill train configs/text/xtoken_opd.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdistill.config import ModelConfig, from_dict
from mmdistill.errors import CompatibilityError, ConfigError
from mmdistill.interfaces import Rollout
from mmdistill.kernels import chunked_token_logp, rows_per_chunk, topk_tail
from mmdistill.modalities.text.config import CrossTokenizerOptions
from mmdistill.modalities.text.hf import DTYPES, check_model_tokenizer, load_causal_lm, unwrap
from mmdistill.modalities.text.rollouts import Context
from mmdistill.modalities.text.xtoken_projection import (
    move_span_mass,
    project_probs,
    projection_from_strings,
    smoothed_log,
)
from mmdistill.stepdist import TopKCategorical

ROLES = ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id")


class ProjectedCategorical(TopKCategorical):
    """The teacher's projected distribution as top-k + tail, with `exact_B_T`: True where the teacher's
    state ends on the student's character boundary (False: the nearest boundary before was used),
    and `span_B_T`: True where the student's token spans several teacher tokens and got its exact span probability."""

    def __init__(
        self,
        topk_idx_N_K: Tensor,
        topk_logp_N_K: Tensor,
        tail_logp_N: Tensor,
        mask_B_T: Tensor,
        exact_B_T: Tensor,
        span_B_T: Tensor,
    ):
        super().__init__(topk_idx_N_K, topk_logp_N_K, tail_logp_N, mask_B_T)
        self.exact_B_T = exact_B_T
        self.span_B_T = span_B_T


def token_strings(tokenizer: Any) -> list[str]:
    """The text each token id adds when it follows other text ("" for special tokens)."""
    special = set(tokenizer.all_special_ids)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor_text = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    ids = range(len(tokenizer))
    pairs = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    out = []
    for i, text in zip(ids, pairs):
        if i in special:
            out.append("")
        elif anchor and text.startswith(anchor_text):
            out.append(text[len(anchor_text) :])
        else:
            out.append(tokenizer.decode([i], clean_up_tokenization_spaces=False))
    return out


def special_token_map(teacher_tok: Any, student_tok: Any) -> dict[int, int]:
    """Teacher special-token id -> student id: by role (eos, pad, bos, unk), else by identical text."""
    out: dict[int, int] = {}
    student_special = {student_tok.convert_ids_to_tokens(i): i for i in student_tok.all_special_ids}
    for i in teacher_tok.all_special_ids:
        text = teacher_tok.convert_ids_to_tokens(i)
        if text in student_special:
            out[i] = student_special[text]
    for role in ROLES:
        t, s = getattr(teacher_tok, role, None), getattr(student_tok, role, None)
        if t is not None and s is not None:
            out[t] = s
    return out


def char_alignment(student_starts_B_T: Tensor, teacher_ends_B_L: Tensor) -> tuple[Tensor, Tensor]:
    """For each student step (the character where its token starts), the teacher position whose
    next-token distribution it reads: the last teacher token ending at or before that character.

    teacher_ends_B_L: end character of each teacher token, non-decreasing per row; left padding
    carries -1.  Returns `(pos_B_T, exact_B_T)`; exact is True where that teacher token ends
    exactly at the student's character.  A step before every teacher token reads the first one
    (inexact).
    """
    ends_B_L = teacher_ends_B_L.cummax(-1).values.contiguous()
    pos_B_T = torch.searchsorted(ends_B_L, student_starts_B_T.contiguous(), right=True) - 1
    first_B = (ends_B_L < 0).sum(-1, keepdim=True)  # index of the first real token
    pos_B_T = torch.maximum(pos_B_T, first_B).clamp(max=ends_B_L.shape[1] - 1)
    exact_B_T = ends_B_L.gather(1, pos_B_T) == student_starts_B_T
    return pos_B_T, exact_B_T


class CrossTokenizerTeacher(torch.nn.Module):
    """A frozen causal LM with its own tokenizer and the projection W onto the run's tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        student_tokenizer: Any,
        name: str = "teacher",
        topk: int = 256,
        smoothing: float = 1e-4,
    ):
        super().__init__()
        if not getattr(tokenizer, "is_fast", False):
            raise CompatibilityError(
                f"models.{name}: the teacher's tokenizer is a slow (Python) tokenizer; cross-tokenizer alignment needs "
                "character offsets: save the teacher with a fast tokenizer (tokenizer.json)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.topk = topk
        self.smoothing = smoothing
        self.student_strings = token_strings(student_tokenizer)
        student_fallback = (
            student_tokenizer.unk_token_id
            if student_tokenizer.unk_token_id is not None
            else student_tokenizer.eos_token_id
        )
        W = projection_from_strings(
            token_strings(tokenizer),
            self.student_strings,
            special_token_map(tokenizer, student_tokenizer),
            student_fallback,
        )
        self.register_buffer("w_index_2_E", W.indices(), persistent=False)  # plain buffers: move with .to(device)
        self.register_buffer("w_value_E", W.values(), persistent=False)
        self.vocab_sizes = tuple(W.shape)  # (Vt, Vs)

    @classmethod
    def load(cls, cfg: ModelConfig, adapter: Any, name: str = "teacher") -> CrossTokenizerTeacher:
        """The checkpoint at `cfg.path` with its own tokenizer, projected onto `adapter.tokenizer`;
        `cfg.options` are checked against `CrossTokenizerOptions`."""
        from transformers import AutoTokenizer

        try:
            opt = from_dict(CrossTokenizerOptions, dict(cfg.options), f"models.{name}.options")
        except ValueError as e:  # a range check of CrossTokenizerOptions
            raise ConfigError(f"models.{name}.options.{e}") from None
        if cfg.path is None:
            raise ConfigError(
                f"models.{name}.kind: a cross_tokenizer teacher needs a 'path' checkpoint saved with its own tokenizer (not tiny / prune / merge)"
            )
        if cfg.lora is not None:
            raise ConfigError(f"models.{name}.lora: a cross_tokenizer model is a frozen teacher; remove lora")
        local = Path(cfg.path)
        if local.is_dir() and not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise CompatibilityError(
                f"models.{name}.path: '{cfg.path}' has no tokenizer; a cross_tokenizer teacher needs the tokenizer it was "
                "trained with saved beside its weights (tokenizer.save_pretrained)"
            )
        try:
            tok = AutoTokenizer.from_pretrained(
                cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompatibilityError(
                f"models.{name}.path: cannot load the teacher's own tokenizer from '{cfg.path}' ({first}); save it beside the weights"
            ) from None
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise CompatibilityError(
                    f"models.{name}: the teacher's tokenizer has neither a pad nor an eos token; add one to it"
                )
            tok.pad_token = tok.eos_token
        model = load_causal_lm(
            cfg.path, dtype=DTYPES[cfg.dtype], revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, name=name
        )
        check_model_tokenizer(model, tok, cfg.path)
        return cls(model, tok, adapter.tokenizer, name=name, topk=opt.topk, smoothing=opt.smoothing).to(adapter.device)

    def projection(self) -> Tensor:
        """W `[Vt, Vs]` as a coalesced sparse float32 tensor (rows sum to 1)."""
        return torch.sparse_coo_tensor(
            self.w_index_2_E, self.w_value_E.float(), self.vocab_sizes, is_coalesced=True, check_invariants=False
        )

    def cannot_generate(self) -> CompatibilityError:
        return CompatibilityError(
            f"models.{self.name} is a cross_tokenizer teacher: it scores the run's rollouts but cannot generate in the run's "
            "tokenizer; use it only as a stage teacher of a divergence objective (reverse_kl, jsd) on student or dataset rollouts, "
            "and evaluate it in its own run"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise self.cannot_generate()

    # ------------------------------------------------------------------ scoring

    def teacher_prompt(self, adapter: Any, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return adapter.format_prompt(question)

    def texts_and_bounds(self, adapter: Any, rollout: Rollout) -> tuple[list[str], Tensor, Tensor]:
        """The teacher's input text per row and the characters where each student step's token starts and ends."""
        if not isinstance(rollout.context, Context):
            raise CompatibilityError(
                f"models.{self.name}: this rollout carries no question texts (context {type(rollout.context).__name__}); "
                "a cross_tokenizer teacher re-reads the prompt as text: use student-sampled or dataset rollouts"
            )
        texts, starts = [], []
        for q, toks, keep in zip(rollout.context.questions, rollout.actions.tolist(), rollout.mask_B_T.tolist()):
            prompt = self.teacher_prompt(adapter, q)
            pieces = [self.student_strings[t] if k else "" for t, k in zip(toks, keep)]
            row, pos = [], len(prompt)
            for piece in pieces:
                row.append(pos)
                pos += len(piece)
            starts.append(row + [pos])
            texts.append(prompt + "".join(pieces))
        bounds_B_T1 = torch.tensor(starts, dtype=torch.long).reshape(len(texts), -1)
        return texts, bounds_B_T1[:, :-1], bounds_B_T1[:, 1:]

    def encode(self, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Left-padded teacher ids, attention mask and token end characters (-1 on padding)."""
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        L = max(len(ids) for ids in enc["input_ids"])
        ids_B_L = torch.full((len(texts), L), self.tokenizer.pad_token_id, dtype=torch.long)
        attn_B_L = torch.zeros(len(texts), L, dtype=torch.long)
        ends_B_L = torch.full((len(texts), L), -1, dtype=torch.long)
        for b, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            n = len(ids)
            if n:
                ids_B_L[b, L - n :] = torch.tensor(ids)
                attn_B_L[b, L - n :] = 1
                ends_B_L[b, L - n :] = torch.tensor([e for _, e in offs])
        return ids_B_L.to(device), attn_B_L.to(device), ends_B_L.to(device)

    @torch.no_grad()
    def step_dist(self, adapter: Any, rollout: Rollout, temperature: float = 1.0) -> ProjectedCategorical:
        """The teacher's next-token distributions at the student's states, in the student's vocabulary."""
        device = rollout.actions.device
        texts, starts_B_T, ends_B_T = self.texts_and_bounds(adapter, rollout)
        ids_B_L, attn_B_L, tok_ends_B_L = self.encode(texts, device)
        pos_B_T, exact_B_T = char_alignment(starts_B_T.to(device), tok_ends_B_L)
        end_pos_B_T, end_exact_B_T = char_alignment(ends_B_T.to(device), tok_ends_B_L)
        mask = rollout.mask_B_T.bool()
        # student tokens that span several teacher tokens, both ends on teacher boundaries ("####" over "#","#","#","#")
        span_B_T = exact_B_T & end_exact_B_T & (end_pos_B_T - pos_B_T >= 2) & mask
        base = unwrap(self.model)
        position_ids = (attn_B_L.cumsum(-1) - 1).clamp(min=0)
        hidden_B_L_H = base.get_decoder()(
            input_ids=ids_B_L, attention_mask=attn_B_L, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        head = base.get_output_embeddings()
        Vt, Vs = self.vocab_sizes
        span_logp_B_T = self.span_logp(
            hidden_B_L_H, head, ids_B_L, pos_B_T, end_pos_B_T, span_B_T, temperature, adapter.chunk_size
        )
        rows_N_H = hidden_B_L_H.gather(1, pos_B_T[..., None].expand(-1, -1, hidden_B_L_H.shape[-1]))[mask]
        span_p_N = torch.where(span_B_T, span_logp_B_T.exp(), 0.0)[mask]
        first_N = ids_B_L.gather(1, (pos_B_T + 1).clamp(max=ids_B_L.shape[1] - 1))[
            mask
        ]  # the span's first teacher token
        token_N = rollout.actions[mask]
        W = self.projection()
        k = min(self.topk, Vs)
        idx, vals, tails = [], [], []
        C = rows_per_chunk(adapter.chunk_size, Vt)  # [C, V_teacher] logits at a time
        for start in range(0, rows_N_H.shape[0], C):
            sl = slice(start, start + C)
            logits_C_Vt = F.linear(rows_N_H[sl], head.weight, getattr(head, "bias", None))[:, :Vt].float()
            p_C_Vs = project_probs(F.log_softmax(logits_C_Vt / temperature, dim=-1), W)
            p_C_Vs = move_span_mass(p_C_Vs, W, span_p_N[sl], first_N[sl], token_N[sl])
            i, v, t = topk_tail(
                smoothed_log(p_C_Vs, self.smoothing), k
            )  # already normalised: topk_tail's log-softmax is the identity
            idx.append(i), vals.append(v), tails.append(t)
        if not idx:
            empty = rows_N_H.new_zeros(0, k, dtype=torch.float32)
            return ProjectedCategorical(empty.long(), empty, empty[:, 0], rollout.mask_B_T, exact_B_T, span_B_T)
        return ProjectedCategorical(
            torch.cat(idx), torch.cat(vals), torch.cat(tails), rollout.mask_B_T, exact_B_T, span_B_T
        )

    def span_logp(
        self,
        hidden_B_L_H: Tensor,
        head: torch.nn.Module,
        ids_B_L: Tensor,
        pos_B_T: Tensor,
        end_pos_B_T: Tensor,
        span_B_T: Tensor,
        temperature: float,
        chunk_size: int,
    ) -> Tensor:
        """log P_T(text of teacher tokens pos+1 .. end_pos | text up to pos) where `span_B_T`, else 0:
        the teacher's own tokens scored along the rollout's text, only at the positions a span needs."""
        B, L = ids_B_L.shape
        if not bool(span_B_T.any()):
            return torch.zeros(span_B_T.shape, device=ids_B_L.device)
        marks_B_L1 = torch.zeros(B, L + 1, dtype=torch.long, device=ids_B_L.device)
        marks_B_L1.scatter_add_(1, pos_B_T, span_B_T.long())
        marks_B_L1.scatter_add_(1, end_pos_B_T, -span_B_T.long())
        need_B_L = marks_B_L1[:, :L].cumsum(-1) > 0  # teacher positions j whose next token lies inside a span
        need_B_L[:, -1] = False
        next_B_L = torch.cat([ids_B_L[:, 1:], ids_B_L[:, -1:]], 1)
        tok_logp_B_L = torch.zeros(B, L, device=ids_B_L.device)
        tok_logp_B_L[need_B_L] = chunked_token_logp(
            hidden_B_L_H[need_B_L],
            head.weight,
            next_B_L[need_B_L],
            temperature=temperature,
            chunk_size=chunk_size,
            vocab_size=self.vocab_sizes[0],
            bias=getattr(head, "bias", None),
        ).float()
        cum_B_L1 = F.pad(tok_logp_B_L.cumsum(-1), (1, 0))  # cum[j] = sum of token log-probs at positions < j
        return torch.where(span_B_T, cum_B_L1.gather(1, end_pos_B_T) - cum_B_L1.gather(1, pos_B_T), 0.0)
