"""The written contract between the core, the objectives and the modalities.

Everything that crosses a seam is defined here and nowhere else:

    core (mmdistill/)  --RolloutRequest-->  Adapter  --Rollout-->  core
    core               --ObjectiveBatch-->  Objective --(loss, metrics)--> core

- An **objective** declares what it needs (`Needs`) and which rollout it wants (`request()`,
  a plain `RolloutRequest`); it receives an `ObjectiveBatch` of step distributions.  It never
  sees a model, an adapter or a run context.
- An **adapter** receives a `RolloutRequest` (plain data) and never the objective; it returns a
  `Rollout` and re-scores any model on a rollout's states as a `StepDist`.  What it can do is
  declared once in its `AdapterSpec`.
- A **teacher** is anything that scores the student's states: the loop asks the adapter for
  `step_dist(teacher, rollout)` whatever the teacher is (a checkpoint, a routed set, a
  cross-tokenizer projection, stored top-k log-probs).  Teacher kinds live in the modalities.
- The **core** calls only the members written here; it probes for nothing (no `hasattr`).

Add an objective, a modality or a task: docs/architecture.md (one file plus one import line).

    python -c "import mmdistill.interfaces as I; help(I.Objective)"
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Source = Literal["student", "teacher", "dataset"]
RolloutKind = Literal["trajectory", "forward_process"]

# ----------------------------------------------------------------------------- step distributions


@runtime_checkable
class StepDist(Protocol):
    """Per-step action distributions of one model on a rollout's states.

    Every method returns per-step tensors `[B, T]` with zeros where `mask_B_T` is 0.  A
    distribution family implements the members that make sense for it and raises a teaching
    `ValueError` for the others (e.g. `topk` on a Gaussian).  Families: `Categorical`,
    `HiddenCategorical`, `TopKCategorical`, `RoutedCategorical`, `Gaussian`, `GaussianBernoulli` (robot arm
    dimensions times a binary gripper), `VelocityStepDist` in `mmdistill.stepdist`.
    """

    mask_B_T: Tensor

    def log_prob(self, actions: Tensor) -> Tensor:
        """log pi(a_t | s_t) of the given actions, `[B, T]`."""
        ...

    def entropy(self) -> Tensor:
        """H(pi(. | s_t)), `[B, T]`."""
        ...

    def divergence(self, teacher: StepDist, beta: float) -> Tensor:
        """Generalized JSD(beta) with self as the student: beta 0 = KL(T||S), 1 = KL(S||T)."""
        ...

    def kl(self, other: StepDist) -> Tensor:
        """KL(self || other), `[B, T]`."""
        ...

    def mode(self) -> Tensor:
        """The most likely action of every step (hard labels, DAgger's argmax)."""
        ...

    def topk(self, k: int) -> StepDist:
        """The distribution kept as its top-k actions plus one tail bucket (categorical only)."""
        ...

    def select(self, rows: slice | Tensor) -> StepDist:
        """The same distribution on batch rows `rows` (micro-batches, routing)."""
        ...

    def to(self, device: torch.device | str) -> StepDist:
        """The distribution moved to `device` (a teacher scored on another device)."""
        ...


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One batch of experience, any modality.  Adapters fill it; objectives read it.

    context:            what the episode was conditioned on (prompts, captions, observations)
    steps:              what the adapter needs to re-score each step (for text: the token ids)
    actions:            the actions taken (tokens_B_T for text, next states for flow steps)
    mask_B_T:           1.0 where a step is trained (completion tokens before and at EOS)
    behavior_logp_B_T:  log-prob of each action under the policy that sampled it
    rewards_B:          verifier / simulator / reward-model scores, if any
    group_ids_B:        rollouts of the same context share an id (GRPO-style groups)
    extras:             per-row tensors that objectives and adapters agree on by name:
                        "from_teacher_B" (guidance rows), "from_teacher_B_T" (mixture tokens),
                        "target_v_B_T_D" (forward-process targets), "advantage_B" (set by
                        `Objective.prepare`), "teacher_steps" (the teacher's privileged view),
                        "seed" (an int derived from the run seed and the step)
    """

    context: Any
    steps: Any
    actions: Tensor
    mask_B_T: Tensor
    behavior_logp_B_T: Tensor
    rewards_B: Tensor | None = None
    group_ids_B: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.actions.shape[0])

    def num_steps(self) -> int:
        """Number of trained steps (the token count for text)."""
        return int(self.mask_B_T.sum().item())

    def with_rewards(self, rewards_B: Tensor) -> Rollout:
        return replace(self, rewards_B=rewards_B)

    def select(self, sl: slice | Tensor) -> Rollout:
        """Rows `sl` (a slice, or a 1-D tensor of row indices) of the batch: micro-batches, routed sub-batches."""
        B = self.batch_size
        fields = ("context", "steps", "actions", "mask_B_T", "behavior_logp_B_T", "rewards_B", "group_ids_B", "extras")
        return Rollout(**{f: _take(self.__dict__[f], sl, B) for f in fields})

    def teacher_view(self) -> Rollout:
        """The rollout as the teacher sees it: the same actions after another context when the adapter
        stored one in `extras["teacher_steps"]` (privileged context: OPSD), else the rollout itself."""
        if "teacher_steps" not in self.extras:
            return self
        return replace(self, steps=self.extras["teacher_steps"])

    def to(self, device: torch.device | str) -> Rollout:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, Tensor) else x

        return replace(
            self,
            steps=move(self.steps),
            actions=move(self.actions),
            mask_B_T=move(self.mask_B_T),
            behavior_logp_B_T=move(self.behavior_logp_B_T),
            rewards_B=move(self.rewards_B),
            group_ids_B=move(self.group_ids_B),
            extras={k: move(v) for k, v in self.extras.items()},
        )


def _take(x: Any, sl: slice | Tensor, B: int) -> Any:
    """Slice every batch-major thing inside x: tensors and lists of length B, dicts, dataclasses."""
    import dataclasses

    if isinstance(x, Tensor):
        return x[sl] if x.dim() > 0 and x.shape[0] == B else x
    if isinstance(x, list) and len(x) == B:
        return [x[i] for i in sl.tolist()] if isinstance(sl, Tensor) else x[sl]
    if isinstance(x, dict):
        return {k: _take(v, sl, B) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return replace(x, **{f.name: _take(x.__dict__[f.name], sl, B) for f in dataclasses.fields(x) if f.init})
    return x


@dataclass(frozen=True)
class TeacherGuidance:
    """Teacher rollouts appended to a student batch (BRTS: always, the best of `n`; AMPO: only for
    prompts where every student rollout failed).  Candidates rank correct first, then by the
    student's mean log-prob of them; the top `keep` join their prompt's group, flagged
    extras["from_teacher_B"]."""

    n: int = 2  # teacher samples per chosen prompt
    keep: int = 1  # how many of them join the batch
    when: Literal["always", "all_failed"] = "always"
    threshold: float = 0.5  # reward that counts as correct
    only_correct: bool = False  # drop selected teacher rollouts that are wrong

    def __post_init__(self) -> None:
        if self.when not in ("always", "all_failed"):
            raise ValueError(f"objective: teacher guidance `when` must be 'always' or 'all_failed', got {self.when!r}")
        if not 1 <= self.keep <= self.n:
            raise ValueError(f"objective: keep={self.keep} teacher rollouts must lie in 1..n={self.n}")


@dataclass(frozen=True)
class RolloutRequest:
    """What the loop asks an adapter for: plain data, built from the objective's `request()` and
    the stage's `rollout:` settings.  An adapter that cannot serve a field raises a ConfigError
    naming it.

    source:               who acts: the student, the teacher, or the dataset's own completions
    kind:                 "trajectory" (sample the policy step by step) or "forward_process"
                          (flow models: noised clean samples with flow-matching targets)
    mixture_beta:         per-step probability that the teacher acts instead (DAgger)
    privileged_template:  the teacher's view sees this context ("{solution}\\n{question}": OPSD)
    guidance:             teacher rollouts to append (BRTS, AMPO)
    cond_dropout:         forward process: fraction of unconditional rows (classifier-free guidance)
    sigma_sampling:       forward process: how noise levels are drawn
    settings:             the stage's `rollout:` section, the adapter's own config dataclass
                          (sampling temperature, group size, tokens / denoising steps, noise)
    """

    source: Source = "student"
    kind: RolloutKind = "trajectory"
    mixture_beta: float | None = None
    privileged_template: str | None = None
    guidance: TeacherGuidance | None = None
    cond_dropout: float = 0.0
    sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    settings: Any = None


def select_guidance(correct_G_n: Tensor, align_G_n: Tensor, keep: int, only_correct: bool = False) -> list[list[int]]:
    """For each of G prompts, the indices (into its n candidates) of the `keep` teacher rollouts
    to use: correct ones first, ties broken by the student's alignment (higher first)."""
    picked = []
    for correct_n, align_n in zip(correct_G_n.bool().tolist(), align_G_n.tolist()):
        order = sorted(range(len(correct_n)), key=lambda i: (not correct_n[i], -align_n[i]))[:keep]
        picked.append([i for i in order if correct_n[i] or not only_correct])
    return picked


# ----------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Needs:
    """What an objective needs from the loop, declared (never probed).

    teacher:          load the stage's teacher model(s)
    teacher_scores:   score the teacher on the rollout's states (`ObjectiveBatch.teacher`);
                      False when the teacher only writes rollouts (SFT on teacher samples, AMPO)
    self_teacher:     the teacher side is the student's own weights on `rollout.teacher_view()`
                      (OPSD); no teacher model is loaded
    reference:        score a frozen copy of the initial student (`ObjectiveBatch.reference`)
    anchor:           score the stage's `anchor` model (`ObjectiveBatch.anchor`, Flow-OPD's MAR)
    rewards:          the rollout must carry task rewards
    sampled_actions:  a policy-gradient objective: every model is scored at the rollout's own
                      sampling temperature so that ratios compare like with like
    whole_groups:     micro-batches must hold whole prompt groups (SCOPE, Uni-OPD)
    """

    teacher: bool = False
    teacher_scores: bool = False
    self_teacher: bool = False
    reference: bool = False
    anchor: bool = False
    rewards: bool = False
    sampled_actions: bool = False
    whole_groups: bool = False


@dataclass
class ObjectiveBatch:
    """Everything an objective may use for one micro-batch."""

    rollout: Rollout
    student: Any  # StepDist with gradient
    teacher: Any | None = None  # StepDist, no gradient
    reference: Any | None = None  # StepDist of the frozen initial policy
    normalizer: float = 1.0  # global number of trained steps in the optimizer step
    anchor: Any | None = None  # StepDist of a frozen anchor model (Manifold Anchor Regularization)


@runtime_checkable
class Objective(Protocol):
    """A training objective: built from its YAML keys (`type:` is its registry name).

    needs:        what the loop must provide (declared at construction)
    temperature:  the temperature at which distributions are scored when `needs.sampled_actions`
                  is False (policy-gradient objectives score at the rollout temperature)
    """

    needs: Needs
    temperature: float

    def request(self, step: int, total_steps: int, rng: random.Random) -> RolloutRequest:
        """The rollout this objective wants at optimizer step `step` (its source, DAgger's annealed
        mixture, OPSD's privileged view, BRTS guidance, ...), without the stage settings."""
        ...

    def prepare(self, rollout: Rollout) -> Rollout:
        """Whole-batch work before the rollout is cut into micro-batches (group advantages, the
        trained timesteps); returns the rollout to train on."""
        ...

    def __call__(self, batch: ObjectiveBatch) -> tuple[Tensor, dict[str, float]]:
        """The loss of one micro-batch (summed over steps, divided by `batch.normalizer`) and
        plain-float metrics."""
        ...


# ----------------------------------------------------------------------------- tasks


@runtime_checkable
class Task(Protocol):
    """Where problems come from and how results are scored.

    `problems(split, n, seed)` returns held-out or training problems (any objects the task's
    adapter understands); `sample_train(rng)` draws one training problem (generated tasks draw
    fresh ones, fixed sets draw from their training split); `summary()` is a one-line
    description printed when a run starts ("" for none)."""

    def problems(self, split: str, n: int | None = None, seed: int = 0) -> list[Any]: ...

    def sample_train(self, rng: random.Random) -> Any: ...

    def summary(self) -> str: ...


# ----------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter class declares about itself; the core reads it instead of probing.

    rollout_config:   dataclass of the stage's `rollout:` section (must have `group_size` and
                      `temperature`); validated by its own `__post_init__`
    eval_config:      dataclass of the stage's `eval:` section (must have `n` and `split`)
    tiny_config:      dataclass of `models.NAME.tiny` (random-init models), None if unsupported
    model_kinds:      values of `models.NAME.kind` besides "checkpoint" (teacher kinds such as
                      "cross_tokenizer" or "stored_logits")
    model_options:    {kind: dataclass of that kind's `models.NAME.options`}, checked at config load
    needs_tokenizer:  the run builds or loads a tokenizer and saves it beside checkpoints
    supports_routing: `teachers: {tag: model}` routes each problem to its tag's teacher
    can_record:       the adapter is also a `Recorder`: `mmdistill record` writes episodes as a dataset
    default_task:     the task `mmdistill eval` uses when none is given
    """

    rollout_config: type
    eval_config: type
    tiny_config: type | None = None
    model_kinds: tuple[str, ...] = ()
    model_options: dict[str, type] = field(default_factory=dict)
    needs_tokenizer: bool = True
    supports_routing: bool = False
    can_record: bool = False
    default_task: str = ""


@runtime_checkable
class RolloutSettings(Protocol):
    """The keys of every adapter's `rollout:` section that the core reads."""

    group_size: int
    temperature: float


@runtime_checkable
class EvalSettings(Protocol):
    """The keys of every adapter's `eval:` section that the core reads."""

    n: int
    split: str


@runtime_checkable
class Adapter(Protocol):
    """One model family: load, sample on-policy, re-score, evaluate, save.

    Class-level members (called before an instance exists, from the pre-flight checks):
    `spec`, `claims_checkpoint(path)`, `check_checkpoint(path, name)`,
    `build_tokenizer(cfg, task, models)`, `check_tokenizer_of(path, tokenizer, name, ...)`,
    `load_tokenizer(path)`.  The instance is built as `cls(tokenizer, device=..., chunk_size=...)`
    and bound to the run's task with `bind(task)`.
    """

    spec: AdapterSpec
    device: torch.device
    chunk_size: int

    def bind(self, task: Any) -> None:
        """Adopt what the task fixes about models (observation and action sizes); may do nothing."""
        ...

    def load_model(self, cfg: Any, name: str = "model") -> torch.nn.Module:
        """A model of this family from a `models:` entry (checkpoint, tiny random init, or a teacher kind)."""
        ...

    def prune_layers(self, model: Any, keep_layers: list[int], lora: Any = None, name: str = "model") -> Any: ...

    def add_lora(self, model: Any, lora: Any) -> Any: ...

    def save(self, model: Any, out_dir: Path) -> None:
        """Write `model` in its ecosystem's own format (transformers, diffusers, LeRobot)."""
        ...

    def unwrap(self, model: Any) -> Any:
        """The bare model under accelerate / DDP / peft wrappers."""
        ...

    def rollout(
        self, request: RolloutRequest, student: Any, teacher: Any, task: Any, problems: list[Any], gen: torch.Generator
    ) -> Rollout:
        """On-policy experience as `request` asks for it; rewards filled when the task has them."""
        ...

    def step_dist(self, model: Any, rollout: Rollout, temperature: float = 1.0) -> StepDist:
        """Re-score any model (student, teacher of any kind, reference) on the rollout's states."""
        ...

    def dist_metrics(self, dist: StepDist, rollout: Rollout) -> dict[str, float]:
        """Extra per-step metrics of the student's distribution (entropy curves); may be empty."""
        ...

    def evaluate(
        self,
        model: Any,
        task: Any,
        cfg: Any,
        seed: int = 0,
        out_dir: Path | None = None,
        tag: str = "eval",
        show: int = 3,
    ) -> dict[str, Any]:
        """Held-out results: a dict with `n` and scalar metrics (accuracy, rewards, success)."""
        ...

    def stage_fingerprint(self, model: Any) -> str:
        """A content hash (sha256 hex) of a model's weights: recorded in each train stage's result.json
        as `weights_sha256`, and checked by teacher kinds that must know which teacher wrote their data."""
        ...


@runtime_checkable
class Recorder(Protocol):
    """Adapters whose `spec.can_record` is True: episodes of a model written as a dataset (LeRobot format)."""

    def record(
        self, model: Any, task: Any, problems: list[Any], root: Path, repo_id: str, sample: bool = True, seed: int = 0
    ) -> dict[str, Any]: ...


# A stage kind runs one `stages[]` entry: `run(ctx, stage) -> result dict` (train, eval, precompute).
StageRunner = Callable[[Any, Any], dict[str, Any]]


@dataclass
class StageKind:
    """What a `stages[].kind` is, declared where it is registered (`STAGE_KINDS.register(name)(StageKind(...))`).

    run:    run(ctx, stage) -> the stage's result dict (an "eval"-kind result has {"kind": "eval", "results": ...})
    uses:   which references the config loader checks before any compute: "train" (student, teacher(s),
            anchor, objective), "teacher" (exactly one teacher: precompute), "evaluate" (the report key ->
            model map of `evaluate:`, no teacher)
    check:  the kind's own check of the stage (its `options:`), called at config load; None for none
    every_rank: run on every process of a multi-process run (the kind shards its own work and writes from
            rank 0); False: rank 0 runs it alone while the others wait, and every rank gets its result
    """

    run: StageRunner
    uses: Literal["train", "teacher", "evaluate"]
    check: Callable[[Any], None] | None = None
    every_rank: bool = False
