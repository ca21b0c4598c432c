"""HF causal-LM adapter: load, sample on-policy, re-score, evaluate, save.

Teacher and student are any `AutoModelForCausalLM` checkpoints (path or hub id)
or tiny random-init Qwen3/Llama models built from a config section.  They may
differ in size and family but must share a tokenizer; padded vocabularies
(e.g. 151,936 vs 152,064 rows) are truncated to the tokenizer's length.  Two
teacher kinds need no shared tokenizer or no live model: `kind: cross_tokenizer`
(X-Token projection, `xtoken.py`) and `kind: stored_logits` (Lightning OPD's
precomputed top-k, `stored_logits.py`).

Sampling is a lean KV-cache loop (no logits processors), recording the
behaviour log-prob of every sampled token.  Re-scoring returns a
`HiddenCategorical`: hidden states plus the LM head, so divergences are
computed in chunks and `B x T x V` logits never exist.

    mmdistill sample runs/quickstart/student_opd/final --task arith --n 4
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmdistill.config import LoraConfig, ModelConfig, TokenizerConfig
from mmdistill.errors import CheckpointError, CompatibilityError, ConfigError
from mmdistill.interfaces import AdapterSpec, Rollout, RolloutRequest, StepDist, TeacherGuidance, select_guidance
from mmdistill.modalities.text.config import (
    CrossTokenizerOptions,
    StoredLogitsOptions,
    TextEvalConfig,
    TextRolloutConfig,
    TinyLMConfig,
)
from mmdistill.modalities.text.engine import build_engine
from mmdistill.modalities.text.evaluate import evaluate_generation
from mmdistill.modalities.text.hf import (
    DTYPES,
    LORA_TARGETS,
    apply_lora,
    build_tiny_lm,
    check_model_tokenizer,
    load_causal_lm,
    unwrap,
)
from mmdistill.modalities.text.rollouts import Context, cat_rollouts
from mmdistill.modalities.text.stored_logits import StoredLogitsTeacher
from mmdistill.modalities.text.tokenizer import build_char_tokenizer, build_word_tokenizer, report_coverage
from mmdistill.modalities.text.xtoken import CrossTokenizerTeacher
from mmdistill.registry import ADAPTERS
from mmdistill.stepdist import HiddenCategorical, RoutedCategorical

# names other modules import from here (robot/tokenized.py, tests)
__all__ = [
    "CausalLMAdapter",
    "Context",
    "cat_rollouts",
    "build_tiny_lm",
    "load_causal_lm",
    "check_model_tokenizer",
    "apply_lora",
    "unwrap",
    "check_tokenizers_match",
    "DTYPES",
    "LORA_TARGETS",
    "TinyLMConfig",
]

TEACHER_KINDS = {
    "cross_tokenizer": CrossTokenizerTeacher,
    "stored_logits": StoredLogitsTeacher,
}  # models.NAME.kind -> class


@ADAPTERS.register("hf_causal_lm")
class CausalLMAdapter:
    """One tokenizer shared by teacher and student; models are passed to each call."""

    spec = AdapterSpec(
        rollout_config=TextRolloutConfig,
        eval_config=TextEvalConfig,
        tiny_config=TinyLMConfig,
        model_kinds=tuple(TEACHER_KINDS),
        model_options={"cross_tokenizer": CrossTokenizerOptions, "stored_logits": StoredLogitsOptions},
        needs_tokenizer=True,
        supports_routing=True,  # `teachers: {tag: model}` routes each problem to the teacher of its meta["tag"]
        can_record=False,
        default_task="arith",
    )

    def __init__(self, tokenizer: Any, device: torch.device | str = "cpu", chunk_size: int = 1024):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.device = torch.device(device)
        self.chunk_size = chunk_size
        self.vocab_size = len(tokenizer)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ConfigError("the tokenizer has neither a pad nor an eos token; add one to the tokenizer")
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self._engines: dict[str, Any] = {}

    def bind(self, task: Any) -> None:
        """Nothing about a text model depends on the task; say how much of the task the tokenizer can spell
        (once per tokenizer and task: a run that just built its tokenizer has said it already)."""
        report_coverage(
            self.tokenizer,
            task.texts(),
            "the task",
            "this tokenizer cannot spell the task: evaluate a checkpoint on the task it was trained on, "
            "or train with tokenizer.path set to a tokenizer that covers it",
        )

    # ------------------------------------------------------------------ checkpoints and tokenizers (class level)

    @staticmethod
    def claims_checkpoint(path: str | Path) -> bool:
        """A transformers causal-LM directory: `config.json` of a causal-LM `model_type` (not a diffusers pipeline)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        p = Path(path)
        if (p / "model_index.json").exists() or not (p / "config.json").is_file():
            return False
        try:
            cfg = json.loads((p / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    @staticmethod
    def check_checkpoint(path: str, name: str) -> None:
        """A local checkpoint directory has a config, weights and a tokenizer (hub ids are checked at load)."""
        p = Path(path)
        if not p.is_dir():
            return
        weights = [*p.glob("*.safetensors"), *p.glob("*.safetensors.index.json"), *p.glob("pytorch_model*.bin")]
        missing = [
            what
            for what, ok in (
                ("config.json", (p / "config.json").is_file()),
                ("weights (*.safetensors)", bool(weights)),
                (
                    "a tokenizer (tokenizer.json or tokenizer_config.json)",
                    any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")),
                ),
            )
            if not ok
        ]
        if missing:
            raise CheckpointError(
                f"models.{name}.path: '{path}' is not a complete transformers checkpoint (no {', no '.join(missing)}); "
                "give a directory written by save_pretrained, e.g. a stage's final/"
            )

    @staticmethod
    def build_tokenizer(cfg: TokenizerConfig, task: Any, models: dict[str, ModelConfig]) -> Any:
        """`tokenizer.path`, else the first checkpoint model's tokenizer, else an offline word (or char) tokenizer;
        then how much of the task it covers (`report_coverage`: a warning when > 1% of the task's words are <unk>)."""
        from transformers import AutoTokenizer

        path = cfg.path or next(
            (m.path for m in models.values() if m.path is not None and m.kind == "checkpoint"), None
        )
        if path is not None:
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(
                    f"cannot load a tokenizer from '{path}' ({str(e).splitlines()[0]}); set tokenizer.path to a tokenizer directory"
                ) from None
            fix = f"the tokenizer of '{path}' does not fit this task: set tokenizer.path to one that does"
        elif cfg.level == "char":
            tok = build_char_tokenizer()
            fix = "set tokenizer.level: word (built from the task's own words) or tokenizer.path to a real tokenizer"
        else:
            tok = build_word_tokenizer(task.vocabulary())
            fix = "set tokenizer.path to a real tokenizer (e.g. a checkpoint's directory) or tokenizer.level: char"
        if cfg.chat_template is not None:
            tok.chat_template = cfg.chat_template
        report_coverage(tok, task.texts(), "the task", fix)
        return tok

    @staticmethod
    def load_tokenizer(path: str | Path) -> Any:
        """The tokenizer saved in a checkpoint directory, a run's `tokenizer/` directory, or a run
        directory holding one; None when there is none."""
        from transformers import AutoTokenizer

        p = Path(path)
        for d in (p, p / "tokenizer"):
            if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
                try:
                    return AutoTokenizer.from_pretrained(str(d))
                except (OSError, ValueError) as e:
                    raise CheckpointError(
                        f"cannot load the tokenizer in '{d}' ({str(e).strip().splitlines()[0]}); the checkpoint is "
                        "incomplete or corrupt"
                    ) from None
        raise CheckpointError(
            f"'{path}' holds no tokenizer (tokenizer.json / tokenizer_config.json); give a checkpoint saved with its "
            "tokenizer, e.g. a stage's final/"
        )

    @staticmethod
    def check_tokenizer_of(path: str, tokenizer: Any, name: str, compare_chat_template: bool = True) -> None:
        """Refuse a checkpoint whose tokenizer is not the run's (before any compute)."""
        from transformers import AutoTokenizer

        try:
            theirs = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(
                f"models.{name}.path: cannot load a tokenizer from '{path}' ({str(e).strip().splitlines()[0]}); check the path"
            ) from None
        check_tokenizers_match(theirs, tokenizer, f"models.{name}", "run", compare_chat_template=compare_chat_template)

    # ------------------------------------------------------------------ loading

    def load_model(self, cfg: ModelConfig, name: str = "model") -> torch.nn.Module:
        """A checkpoint, a tiny random-init model, or a teacher kind (`cross_tokenizer`, `stored_logits`)."""
        if cfg.kind != "checkpoint":
            if cfg.kind not in TEACHER_KINDS:
                raise ConfigError(
                    f"models.{name}.kind: '{cfg.kind}' is not a text model kind; known: checkpoint, {', '.join(TEACHER_KINDS)}"
                )
            return TEACHER_KINDS[cfg.kind].load(cfg, self, name)
        if cfg.options:
            raise ConfigError(
                f"models.{name}.options: a checkpoint model takes no options; remove them (or set models.{name}.kind)"
            )
        dtype = DTYPES[cfg.dtype]
        if cfg.tiny is not None:
            model = build_tiny_lm(cfg.tiny, self.tokenizer).to(dtype)
        else:
            assert cfg.path is not None
            model = load_causal_lm(
                cfg.path, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, name=name
            )
            check_model_tokenizer(model, self.tokenizer, cfg.path)
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora)
        return model.to(cfg.device or self.device)

    def prune_layers(
        self, model: torch.nn.Module, keep_layers: list[int], lora: LoraConfig | None = None, name: str = "model"
    ) -> torch.nn.Module:
        """A copy of `model` with only `keep_layers` of its decoder (layer dropping)."""
        base = copy.deepcopy(unwrap(model))
        decoder = base.get_decoder()
        layers = decoder.layers
        bad = [i for i in keep_layers if not -len(layers) <= i < len(layers)]
        if bad:
            raise ConfigError(
                f"models.{name}.prune.keep_layers: {bad} out of range for a model with {len(layers)} layers"
            )
        kept = [layers[i] for i in keep_layers]
        for new_idx, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        decoder.layers = torch.nn.ModuleList(kept)
        base.config.num_hidden_layers = len(kept)
        if getattr(base.config, "layer_types", None):
            base.config.layer_types = [base.config.layer_types[i] for i in keep_layers]
        if lora is not None:
            base = apply_lora(base, lora)
        return base.to(self.device)

    def add_lora(self, model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
        return apply_lora(model, lora).to(self.device)

    def unwrap(self, model: Any) -> Any:
        """The transformers model under accelerate / DDP / peft wrappers."""
        return unwrap(model)

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """A standard HF checkpoint (merged, if LoRA) plus the tokenizer."""
        m = model
        while hasattr(m, "module"):
            m = m.module
        if hasattr(m, "merge_and_unload"):  # peft: save the adapter too, then the merged model
            m.save_pretrained(str(Path(out_dir) / "lora_adapter"))
            m = copy.deepcopy(m).merge_and_unload()
        m.save_pretrained(str(out_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out_dir))

    def stage_fingerprint(self, model: Any) -> str:
        """sha256 of a model's weights (names, dtypes, shapes, bytes); a stored-logits teacher's is
        the sha256 of the checkpoint that wrote its shards."""
        if isinstance(model, StoredLogitsTeacher):
            return model.fingerprint()
        h = hashlib.sha256()
        for key, t in sorted(unwrap(model).state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ prompts

    def format_prompt(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"Q: {question}\nA: "

    def encode_prompts(self, questions: list[str]) -> tuple[Tensor, Tensor]:
        texts = [self.format_prompt(q) for q in questions]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ sampling

    def engine(self, name: str = "hf") -> Any:
        """The generation engine `rollout.engine` names (built once per run)."""
        if name not in self._engines:
            self._engines[name] = build_engine(name, self.vocab_size, self.eos_id, self.pad_id)
        return self._engines[name]

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        questions: list[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        engine: str = "hf",
        mixture: tuple[Any, float] | None = None,
    ) -> Rollout:
        """On-policy sampling through the generation engine; temperature 0 is greedy.
        `mixture=(teacher, beta)`: each token is the teacher's with probability beta (DAgger)."""
        for m in (model, mixture[0] if mixture is not None else None):
            if isinstance(m, (CrossTokenizerTeacher, StoredLogitsTeacher)):  # teacher kinds score, they do not generate
                raise m.cannot_generate()
        model_was_training = model.training
        model.eval()
        prompt_ids, prompt_attn = self.encode_prompts(questions)
        gen = self.engine(engine).generate(
            model, prompt_ids, prompt_attn, max_new_tokens, temperature, generator, mixture=mixture
        )
        model.train(model_was_training)
        rollout = Rollout(
            context=Context(list(questions), prompt_ids.shape[1]),
            steps={"prompt_ids": prompt_ids, "prompt_attn": prompt_attn},
            actions=gen.tokens_B_T,
            mask_B_T=gen.mask_B_T,
            behavior_logp_B_T=gen.logp_B_T,
        )
        if gen.from_teacher_B_T is not None:
            rollout.extras["from_teacher_B_T"] = gen.from_teacher_B_T
        return rollout

    def dataset_rollout(self, questions: list[str], completions: list[str]) -> Rollout:
        """Gold or teacher-written completions as a rollout (behaviour log-probs unknown: zeros)."""
        return self.ids_rollout(
            questions, [self.tokenizer(c, add_special_tokens=False)["input_ids"] + [self.eos_id] for c in completions]
        )

    def ids_rollout(self, questions: list[str], completion_ids: list[Any]) -> Rollout:
        """Stored completion token ids as a rollout: prompts encoded as at sampling time, completions
        right-padded, behaviour log-probs zero."""
        prompt_ids, prompt_attn = self.encode_prompts(questions)
        T = max(len(c) for c in completion_ids)
        tokens = torch.full((len(completion_ids), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(completion_ids), T)
        for i, c in enumerate(completion_ids):
            tokens[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            mask[i, : len(c)] = 1.0
        return Rollout(
            context=Context(list(questions), prompt_ids.shape[1]),
            steps={"prompt_ids": prompt_ids, "prompt_attn": prompt_attn},
            actions=tokens.to(self.device),
            mask_B_T=mask.to(self.device),
            behavior_logp_B_T=torch.zeros(len(completion_ids), T, device=self.device),
        )

    def rollout(
        self, request: RolloutRequest, student: Any, teacher: Any, task: Any, problems: list, gen: torch.Generator
    ) -> Rollout:
        """The training loop's rollout, as `request` asks: student or teacher samples scored by the task's
        verifier, or the dataset's own completions (`source="dataset"`: gold solutions, or a teacher's
        stored completions on a teacher_shards task).  `request.mixture_beta`: DAgger, tokens drawn from the
        teacher with that probability; `request.privileged_template`: OPSD, the teacher's view sees the
        reference solution; `request.guidance`: BRTS / AMPO, teacher rollouts appended to the batch
        (flagged in extras["from_teacher_B"]).  Sampling settings come from `request.settings`."""
        rc = request.settings if request.settings is not None else TextRolloutConfig()
        if request.kind != "trajectory":
            raise ConfigError(
                f"objective: a text rollout is a sampled trajectory; rollout kind {request.kind!r} is for flow models"
            )
        source = request.source
        questions = [p.question for p in problems]
        if source == "dataset":
            rollout = self.ids_rollout(questions, [p.dataset_ids(self.tokenizer) for p in problems])
        else:
            mixture = None
            if request.mixture_beta is not None and source == "student":
                if teacher is None or isinstance(teacher, dict):
                    raise ConfigError(
                        "a DAgger mixture samples from one teacher; set the stage's `teacher`, not `teachers`"
                    )
                mixture = (teacher, request.mixture_beta)
            model = student if source == "student" else teacher
            if model is None or isinstance(model, dict):
                raise ConfigError("teacher rollouts sample from one teacher; set the stage's `teacher`, not `teachers`")
            rollout = self.sample(
                model, questions, rc.max_new_tokens, rc.temperature, gen, engine=rc.engine, mixture=mixture
            )
            rollout.rewards_B = self.rewards(task, problems, rollout)
        rollout.context.tags = [p.meta.get("tag") for p in problems]
        rollout.context.keys = [p.meta.get("key") for p in problems]
        if request.privileged_template is not None:
            rollout.extras["teacher_steps"] = self.privileged_prompts(problems, request.privileged_template)
        if request.guidance is not None and source == "student":
            rollout = self.add_teacher_rollouts(rollout, student, teacher, task, problems, rc, gen, request.guidance)
        return rollout

    def rewards(self, task: Any, problems: list, rollout: Rollout) -> Tensor:
        texts = self.decode(rollout)
        return torch.tensor([task.reward(p, t) for p, t in zip(problems, texts)], device=self.device)

    def privileged_prompts(self, problems: list, template: str = "{solution}\n{question}") -> dict[str, Tensor]:
        """Prompts that also show the reference solution (OPSD's teacher context), e.g.
        "Reference solution: {solution}\n\nNow solve: {question}" for a chat model."""
        texts = [template.format(solution=p.solution, question=p.question, answer=p.answer) for p in problems]
        ids, attn = self.encode_prompts(texts)
        return {"prompt_ids": ids, "prompt_attn": attn}

    @torch.no_grad()
    def mean_logp(self, model: Any, rollout: Rollout) -> Tensor:
        """Each row's mean token log-prob under `model` (how well the model 'understands' a completion)."""
        lp_B_T = self.step_dist(model, rollout).log_prob(rollout.actions)
        return (lp_B_T * rollout.mask_B_T).sum(1) / rollout.mask_B_T.sum(1).clamp(min=1)

    def add_teacher_rollouts(
        self,
        rollout: Rollout,
        student: Any,
        teacher: Any,
        task: Any,
        problems: list,
        rc: TextRolloutConfig,
        gen: Any,
        guidance: TeacherGuidance,
    ) -> Rollout:
        """Append selected teacher rollouts to a student rollout (groups of `rc.group_size` rows per prompt).

        For each prompt whose group qualifies (`guidance.when`: "always", or "all_failed" = no student
        rollout reached `guidance.threshold`), the teacher samples `guidance.n` completions; they are
        ranked correct first, then by the student's mean log-prob of them (best aligned / most
        comprehensible first), and the top `guidance.keep` join the batch in the prompt's group.
        """
        g = rc.group_size
        B = rollout.batch_size
        rewards_G_g = rollout.rewards_B.view(-1, g)
        group_ids_B = torch.arange(B // g, device=self.device).repeat_interleave(g)
        rollout.group_ids_B = group_ids_B
        rollout.extras["from_teacher_B"] = torch.zeros(B, dtype=torch.bool, device=self.device)
        if guidance.when == "all_failed":
            chosen = (rewards_G_g.max(1).values < guidance.threshold).nonzero().flatten().tolist()
        else:
            chosen = list(range(B // g))
        if not chosen:
            return rollout
        if teacher is None or isinstance(teacher, dict):
            raise ConfigError("teacher guidance samples from one teacher; set the stage's `teacher`")
        cand_problems = [problems[k * g] for k in chosen for _ in range(guidance.n)]
        cand = self.sample(
            teacher, [p.question for p in cand_problems], rc.max_new_tokens, rc.temperature, gen, engine=rc.engine
        )
        cand.rewards_B = self.rewards(task, cand_problems, cand)
        was_training = student.training
        student.eval()
        align_B = self.mean_logp(student, cand)
        student.train(was_training)
        correct_B = cand.rewards_B >= guidance.threshold
        per_prompt = select_guidance(
            correct_B.view(len(chosen), guidance.n),
            align_B.view(len(chosen), guidance.n),
            guidance.keep,
            guidance.only_correct,
        )
        keep_list = [k * guidance.n + i for k, idx in enumerate(per_prompt) for i in idx]
        if not keep_list:
            return rollout
        keep = torch.tensor(keep_list, dtype=torch.long, device=self.device)
        picked = cand.select(keep)
        picked.context.tags = [cand_problems[i].meta.get("tag") for i in keep.tolist()]
        picked.group_ids_B = torch.tensor([chosen[i // guidance.n] for i in keep.tolist()], device=self.device)
        picked.extras = {"from_teacher_B": torch.ones(keep.numel(), dtype=torch.bool, device=self.device)}
        return cat_rollouts(rollout, picked, self.pad_id)

    def decode(self, rollout: Rollout) -> list[str]:
        out = []
        for toks, m in zip(rollout.actions.tolist(), rollout.mask_B_T.tolist()):
            ids = [t for t, keep in zip(toks, m) if keep and t != self.eos_id]
            out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    # ------------------------------------------------------------------ re-scoring

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> StepDist:
        """Re-score `model` on the rollout's states: hidden states at every completion step + LM head.
        A dict {tag: model} routes each row to the teacher of its tag; a model on another device
        (models.X.device) scores there and its result is moved next to the student."""
        if isinstance(model, dict):
            return self._routed_step_dist(model, rollout, temperature)
        if isinstance(model, (CrossTokenizerTeacher, StoredLogitsTeacher)):  # teacher kinds score in their own way
            return model.step_dist(self, rollout, temperature)
        dev = next(model.parameters()).device
        prompt_ids, prompt_attn = rollout.steps["prompt_ids"].to(dev), rollout.steps["prompt_attn"].to(dev)
        actions, mask_B_T = rollout.actions.to(dev), rollout.mask_B_T.to(dev)
        P = prompt_ids.shape[1]
        ids = torch.cat([prompt_ids, actions], 1)
        attn = torch.cat([prompt_attn, mask_B_T.long()], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        base = unwrap(model)
        decoder = base.get_decoder()
        hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        T = actions.shape[1]
        hidden_B_T_H = hidden[:, P - 1 : P - 1 + T]
        head = base.get_output_embeddings()
        dist = HiddenCategorical(
            hidden_B_T_H,
            head.weight,
            mask_B_T,
            vocab_size=self.vocab_size,
            temperature=temperature,
            chunk_size=self.chunk_size,
            head_bias_V=getattr(head, "bias", None),
        )
        return dist if dev == self.device else dist.to(self.device)

    def _routed_step_dist(self, teachers: dict[str, Any], rollout: Rollout, temperature: float) -> RoutedCategorical:
        tags = rollout.context.tags
        if tags is None or any(t is None for t in tags):
            raise ConfigError(
                "routing to several teachers needs each problem's tag (problem.meta['tag']); "
                "use a task that tags its problems, e.g. task: {type: mixture, tasks: {tag: {...}}}"
            )
        unknown = sorted(set(tags) - set(teachers))
        if unknown:
            raise ConfigError(
                f"problems tagged {unknown} have no teacher; the stage's teachers are {sorted(teachers)}: add one per tag"
            )
        parts = []
        for name, model in teachers.items():
            rows = torch.tensor([i for i, t in enumerate(tags) if t == name], dtype=torch.long, device=self.device)
            if rows.numel():
                parts.append((rows, self.step_dist(model, rollout.select(rows), temperature)))
        return RoutedCategorical(parts, rollout.mask_B_T)

    def dist_metrics(self, dist: StepDist, rollout: Rollout) -> dict[str, float]:
        """No extra per-step metrics for text students."""
        return {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self,
        model: Any,
        task: Any,
        cfg: TextEvalConfig,
        seed: int = 0,
        out_dir: Path | None = None,
        tag: str = "eval",
        show: int = 3,
    ) -> dict[str, Any]:
        """Accuracy (and pass@k) by generation plus the task's verifier (`evaluate.py`); nothing is written to `out_dir`."""
        return evaluate_generation(self, model, task, cfg, seed=seed, show=show)


# ---------------------------------------------------------------------- tokenizer checks


def _tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    return {
        "vocab": tok.get_vocab(),
        "special": {k: getattr(tok, k, None) for k in ("eos_token", "pad_token", "bos_token", "unk_token")},
        "chat_template": getattr(tok, "chat_template", None),
    }


def check_tokenizers_match(
    teacher: Any,
    student: Any,
    teacher_name: str = "teacher",
    student_name: str = "student",
    compare_chat_template: bool = True,
) -> None:
    """Refuse a teacher/student pair whose tokenizers or chat templates differ."""
    from transformers import AutoTokenizer

    if isinstance(teacher, (str, Path)):
        teacher = AutoTokenizer.from_pretrained(str(teacher))
    if isinstance(student, (str, Path)):
        student = AutoTokenizer.from_pretrained(str(student))
    a, b = _tokenizer_fingerprint(teacher), _tokenizer_fingerprint(student)
    if a["vocab"] != b["vocab"]:
        only_t = sorted(set(a["vocab"]) - set(b["vocab"]))[:3]
        only_s = sorted(set(b["vocab"]) - set(a["vocab"]))[:3]
        diff = f"sizes {len(a['vocab'])} vs {len(b['vocab'])}"
        if only_t or only_s:
            diff += f", e.g. {only_t} only in the {teacher_name}, {only_s} only in the {student_name}"
        else:
            diff += ", same tokens with different ids"
        raise CompatibilityError(
            f"{teacher_name} and {student_name} tokenizers differ ({diff}); on-policy distillation needs one shared "
            "tokenizer: pick models of one family or give the teacher `kind: cross_tokenizer`"
        )
    if compare_chat_template and a["chat_template"] != b["chat_template"]:
        raise CompatibilityError(
            f"{teacher_name} and {student_name} chat templates differ; set tokenizer.chat_template so both see the same prompts"
        )
    if a["special"]["eos_token"] != b["special"]["eos_token"]:  # pad is set per run and does not change distributions
        raise CompatibilityError(
            f"{teacher_name} and {student_name} end-of-sequence tokens differ ({a['special']['eos_token']!r} vs {b['special']['eos_token']!r}); "
            "use tokenizers of one family"
        )
