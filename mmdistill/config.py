"""Typed run configuration: YAML -> dataclasses, dotted overrides, validation.

Every key is checked before any compute: an unknown key, a wrong type or a
missing file is refused with one line naming the key path and the fix.

    mmdistill train configs/text/quickstart.yaml stages.student_opd.train.steps=10
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmdistill.errors import ConfigError
from mmdistill.rundir import expand

# ----------------------------------------------------------------------------- schema


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # null: the adapter's default (attention projections)


@dataclass
class PruneConfig:
    """Initialise a smaller student from a teacher by keeping some of its decoder layers
    (layer dropping, as in DistilBERT and Minitron); distillation then repairs the rest."""

    source: str  # a name in `models` or an earlier stage
    keep_layers: list[int] = field(default_factory=list)


@dataclass
class MergeConfig:
    """Initialise a model as the weighted average of other models' weights (same architecture),
    e.g. a Flow-OPD cold start that merges the expert teachers; weights default to equal."""

    sources: list[str] = field(default_factory=list)  # names in `models` or earlier stages
    weights: list[float] | None = None


@dataclass
class ModelConfig:
    """Where a model comes from: a checkpoint (`path`, a directory or hub id), `tiny`
    (random init, sized by the adapter's tiny config: `TinyLMConfig` for text,
    `TinyFlowConfig` for flow), `prune` (layers kept from another model) or `merge`
    (the average of other models)."""

    path: str | None = None
    tiny: dict[str, Any] | None = None  # checked against the adapter's tiny config in `validate`
    prune: PruneConfig | None = None
    merge: MergeConfig | None = None
    lora: LoraConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    # e.g. "cuda:1": keep this (teacher) model on another device; scores are moved to the student's
    device: str | None = None
    kind: str = "checkpoint"  # or a teacher kind of the adapter (AdapterSpec.model_kinds), e.g. cross_tokenizer
    options: dict[str, Any] = field(default_factory=dict)  # options of that kind, checked by the adapter


@dataclass
class TokenizerConfig:
    """The run's tokenizer, built by the adapter (`build_tokenizer`): from `path`, else from the
    first checkpoint model, else offline from the task's vocabulary; saved beside every checkpoint."""

    path: str | None = None
    chat_template: str | None = None
    level: Literal["word", "char"] = "word"  # offline tokenizers: words as tokens, or one token per character


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 32  # sequences per optimizer step (prompts x group_size)
    micro_batch_size: int | None = None  # gradient accumulation when smaller than batch_size
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    max_grad_norm: float | None = 1.0
    # optimizer steps on each rollout batch (PPO-style reuse; clipped objectives stay valid)
    updates_per_rollout: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    # early stop: {eval metric: target}, e.g. {position_reward: 0.4}
    stop_at: dict[str, float] = field(default_factory=dict)
    min_lr_ratio: float = 0.0  # cosine / linear schedules decay to lr * min_lr_ratio
    save_every: int = 50
    chunk_size: int = 1024  # rows of logits materialised at once in divergences
    # >= batch_size: the teacher scores the whole rollout in one forward, not per micro-batch
    teacher_batch_size: int | None = None
    max_nonfinite_steps: int = 5  # optimizer steps in a row with a NaN / inf loss or gradient before the run stops
    # an optimizer step per shuffled minibatch of this many rows (of the fresh batch); None: one per pass
    minibatch_size: int | None = None
    # DAgger-style aggregation: also train on the rollouts of the previous K steps (closed-form objectives only)
    replay_rounds: int = 0
    # sampling shards of a global batch, each with its own generator (default: the number of processes); equal
    # shards give equal runs on any process count that divides them
    rollout_shards: int | None = None


@dataclass
class StageConfig:
    name: str = "train"
    kind: str = "train"  # a registered stage kind: train, eval, or one a modality adds (precompute)
    student: str | None = None  # a key of `models` or the name of an earlier stage
    teacher: str | None = None
    teachers: dict[str, str] = field(default_factory=dict)  # routing: prompt tag -> teacher (Flow-OPD)
    anchor: str | None = None  # frozen task-agnostic model (Manifold Anchor Regularization)
    objective: dict[str, Any] = field(default_factory=lambda: {"type": "opd"})
    task: dict[str, Any] | None = None
    rollout: Any = field(default_factory=dict)  # the adapter's own rollout config (AdapterSpec.rollout_config)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Any = field(default_factory=dict)  # the adapter's own eval config (AdapterSpec.eval_config)
    evaluate: dict[str, str] = field(default_factory=dict)  # kind=eval: report key -> model ref
    options: dict[str, Any] = field(default_factory=dict)  # options of a modality's stage kind (precompute, harness)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # experiment tracking through accelerate's trackers (rank 0): the scalars of every metrics.jsonl
    tracker: Literal["tensorboard", "trackio", "wandb"] | None = None
    adapter: str = "hf_causal_lm"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    task: dict[str, Any] = field(default_factory=lambda: {"type": "arith"})
    models: dict[str, ModelConfig] = field(default_factory=dict)
    stages: list[StageConfig] = field(default_factory=list)


# Sections that may be given at the top level as defaults for every stage.
STAGE_DEFAULT_SECTIONS = ("rollout", "train", "eval", "objective")


# ----------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return origin.__name__ if isinstance(origin, type) else str(tp)
    return tp.__name__ if isinstance(tp, type) else str(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclass, float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `float | None` and the like: the one real type's own message says more
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}; fix the value of '{path}'")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}; set '{path}' to one of them"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {k: _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}; write e.g. {path}=0.001")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value!r} is not a finite number; write a finite value, e.g. {path}=0.001")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}; write e.g. {path}=10")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    return value


# Keys and objective names that were replaced: (the last part of the key path, or "objective:NAME") -> the fix.
RENAMED = {
    "cross_tokenizer": "a cross-tokenizer teacher is now a model kind: write `kind: cross_tokenizer` in that model's entry",
    "objective:xtoken_kl": (
        "the cross-tokenizer teacher is now a model kind: give the teacher `kind: cross_tokenizer` and use objective "
        "type reverse_kl (or jsd with its beta)"
    ),
    "objective:lightning_opd": (
        "stored teacher log-probs are now a model kind: give the teacher `kind: stored_logits` (path: the precompute "
        "stage's shards) and use objective type reverse_kl (or jsd) with source: dataset"
    ),
}


def _unknown_key(key: str, known: list[str], path: str) -> ConfigError:
    where = f"{path}.{key}" if path else key
    if key in RENAMED:
        return ConfigError(f"config key '{where}' is no longer read: {RENAMED[key]}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{where}'; {hint}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), names, path)
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            where = f"{path}.{f.name}" if path else f.name
            raise ConfigError(f"{where}: missing; this section needs it, e.g. {where}=...")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a range check in the dataclass's __post_init__ names its bare key
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def check_kwargs(fn: Any, kwargs: dict, path: str) -> dict:
    """Validate keyword arguments for a registered builder (class or function) by its signature."""
    sig = inspect.signature(fn)
    params = {
        n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # pragma: no cover - unresolvable annotations
        hints = {}
    out = {}
    for key, value in kwargs.items():
        if key not in params:
            raise _unknown_key(key, sorted(params), path)
        out[key] = _convert(value, hints.get(key, Any), f"{path}.{key}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in out]
    if missing:
        raise ConfigError(f"{path}: missing required key '{missing[0]}'; add {path}.{missing[0]}=...")
    return out


# ----------------------------------------------------------------------------- loading


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, dotted: str) -> None:
    """Apply `a.b.c=value` to the raw YAML dict; `stages.NAME.x` addresses a stage by name."""
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' has no '='; write KEY.PATH=VALUE, e.g. train.steps=10")
    key, _, text = dotted.partition("=")
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # stages.NAME
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if not match:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ConfigError(f"override '{key}': no stage named '{part}'; stages are {names}")
            node = match[0]
            continue
        if part not in node or node[part] is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
    value = _parse_scalar(text)
    if value is None and text.strip() == "~" and parts[-1].endswith(("dir", "path")):
        value = "~"  # `run_dir=~` is the home directory, not YAML's null
    node[parts[-1]] = value


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("objective",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def normalise(raw: dict) -> dict:
    """A config without `stages` is one train stage; top-level rollout/train/eval/objective
    sections are defaults for every stage (a stage's own keys win)."""
    raw = copy.deepcopy(raw)
    defaults = {k: raw.pop(k) for k in STAGE_DEFAULT_SECTIONS if k in raw}
    for key, value in defaults.items():
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping (defaults for every stage), got {value!r}; fix or remove {key}"
            )
    stage_keys = {"student", "teacher", "teachers", "anchor", "kind", "name", "evaluate"}
    if "stages" not in raw:
        stage = {k: raw.pop(k) for k in list(raw) if k in stage_keys}
        raw["stages"] = [stage]
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        raise ConfigError("stages: expected a non-empty list of stages")
    stages = []
    for i, s in enumerate(raw["stages"]):
        if not isinstance(s, dict):
            raise ConfigError(f"stages[{i}]: expected a mapping, got {s!r}")
        if "precompute" in s and "options" not in s:  # the options section's earlier name
            s = {("options" if k == "precompute" else k): v for k, v in s.items()}
        merged = _deep_merge({k: v for k, v in defaults.items()}, s)
        if "objective" in s and "objective" in defaults and isinstance(s["objective"], dict):
            # a stage that names another objective type does not inherit the default's keys
            if s["objective"].get("type", defaults["objective"].get("type")) == defaults["objective"].get("type"):
                merged["objective"] = {**defaults["objective"], **s["objective"]}
        stages.append(merged)
    raw["stages"] = stages
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML, apply overrides, validate everything; raise ConfigError on any problem."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: byte {e.start} is not UTF-8 ({e.reason}); save the file as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    for ov in overrides or []:
        apply_override(raw, ov)
    _resolve_relative_paths(raw, p.parent)
    return config_from_raw(raw)


def _resolve_relative_paths(raw: dict, config_dir: Path) -> None:
    """A task file given relative to the config (or the packaged configs) is found from any cwd."""
    root = config_dir
    while root.name and root.name != "configs":
        root = root.parent
    tasks = [raw.get("task")] + [s.get("task") for s in raw.get("stages", []) or [] if isinstance(s, dict)]
    for t in tasks:
        if not isinstance(t, dict):
            continue
        for key in ("path", "test_path"):
            v = t.get(key)
            if isinstance(v, str):
                v = t[key] = str(expand(v))
            if isinstance(v, str) and not Path(v).is_absolute() and not Path(v).exists():
                for base in (config_dir, root.parent if root.name == "configs" else None):
                    if base is not None and (base / v).exists():
                        t[key] = str(base / v)
                        break


def config_from_raw(raw: dict) -> RunConfig:
    raw = normalise(raw)
    stages = raw.pop("stages")
    cfg = from_dict(RunConfig, raw)
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir: empty; give a directory for the run's outputs, e.g. run_dir=runs/NAME")
    cfg.run_dir = str(expand(cfg.run_dir))
    # stage paths read as the override that would fix them: stages.NAME.train.steps
    cfg.stages = [
        from_dict(StageConfig, s, f"stages.{s.get('name', 'train') if isinstance(s.get('name', 'train'), str) else i}")
        for i, s in enumerate(stages)
    ]
    validate(cfg)
    return cfg


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path on disk, or one inside the packaged configs (`configs/text/quickstart.yaml`)."""
    p = expand(path)
    if p.is_dir():
        raise ConfigError(
            f"'{path}' is a directory; give a YAML config file (to continue a run: mmdistill train --resume {path})"
        )
    if p.exists():
        return p
    import mmdistill.configs as pkg

    rel = Path(*p.parts[1:]) if len(p.parts) > 1 and p.parts[0] == "configs" else p
    packaged = Path(pkg.__file__).parent / rel
    if packaged.exists():
        return packaged
    raise ConfigError(
        f"config file '{path}' not found; give a path to a YAML file (`mmdistill list` shows the packaged ones)"
    )


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that need the whole config (references, registries, files); the stage
    `rollout:` and `eval:` sections become the adapter's own config dataclasses here."""
    from mmdistill.registry import ADAPTERS, OBJECTIVES, STAGE_KINDS, TASKS

    if cfg.adapter not in ADAPTERS:
        raise ConfigError(f"adapter: unknown adapter '{cfg.adapter}'; known: {', '.join(ADAPTERS.names())}")
    _check_task(cfg.task, "task", TASKS)
    spec = ADAPTERS.get(cfg.adapter).spec
    for name, m in cfg.models.items():
        if sum(x is not None for x in (m.path, m.tiny, m.prune, m.merge)) != 1:
            raise ConfigError(
                f"models.{name}: give exactly one of 'path' (checkpoint), 'tiny' (random init), "
                "'prune' (layers of another model) or 'merge' (average of other models)"
            )
        if m.kind != "checkpoint" and m.kind not in spec.model_kinds:
            known = ", ".join(("checkpoint", *spec.model_kinds))
            raise ConfigError(
                f"models.{name}.kind: '{m.kind}' is not a model kind of adapter '{cfg.adapter}'; known: {known}"
            )
        if isinstance(m.tiny, dict):
            if spec.tiny_config is None:
                raise ConfigError(
                    f"models.{name}.tiny: adapter '{cfg.adapter}' cannot build random-init models; give a 'path'"
                )
            m.tiny = from_dict(spec.tiny_config, m.tiny, f"models.{name}.tiny")
        if m.merge is not None:
            if len(m.merge.sources) < 2:
                raise ConfigError(
                    f"models.{name}.merge.sources: list at least two models to average, e.g. [teacher_a, teacher_b]"
                )
            if m.merge.weights is not None and (
                len(m.merge.weights) != len(m.merge.sources) or abs(sum(m.merge.weights) - 1) > 1e-6
            ):
                raise ConfigError(
                    f"models.{name}.merge.weights: give one weight per source, summing to 1 (or null for equal weights)"
                )
        if m.prune is not None and not m.prune.keep_layers:
            raise ConfigError(f"models.{name}.prune.keep_layers: empty; list the decoder layers to keep, e.g. [0, 3]")
        if m.path is not None:
            m.path = str(expand(m.path))
        if m.kind in spec.model_options:  # a teacher kind's options, checked before any compute
            m.options = dataclasses.asdict(_section(spec.model_options[m.kind], m.options, f"models.{name}.options"))
        elif m.options:
            raise ConfigError(f"models.{name}.options: a '{m.kind}' model takes no options; remove them")
        if m.kind == "checkpoint" and m.path is not None and _looks_local(m.path) and not Path(m.path).exists():
            raise ConfigError(
                f"models.{name}.path: checkpoint '{m.path}' does not exist; fix the path or train it first"
            )
    if cfg.tracker is not None:
        _check_tracker(cfg.tracker)
    if cfg.tokenizer.path is not None:
        cfg.tokenizer.path = str(expand(cfg.tokenizer.path))
    if cfg.tokenizer.path is not None and _looks_local(cfg.tokenizer.path) and not Path(cfg.tokenizer.path).exists():
        raise ConfigError(f"tokenizer.path: '{cfg.tokenizer.path}' does not exist; fix the path")
    seen: list[str] = []
    for st in cfg.stages:
        where = f"stages.{st.name}"
        if st.name in seen or st.name in cfg.models:
            raise ConfigError(f"{where}: the name '{st.name}' is used twice; give each stage and model its own name")
        if st.kind not in STAGE_KINDS:
            raise ConfigError(f"{where}.kind: unknown stage kind '{st.kind}'; known: {', '.join(STAGE_KINDS.names())}")
        st.rollout = _section(spec.rollout_config, st.rollout, f"{where}.rollout")
        st.eval = _section(spec.eval_config, st.eval, f"{where}.eval")
        refs = list(cfg.models) + seen
        kind = STAGE_KINDS.get(st.kind)
        if kind.uses == "train":
            _validate_train_stage(cfg, st, refs, where, spec, OBJECTIVES)
            if st.task is not None:
                _check_task(st.task, f"{where}.task", TASKS)
        elif kind.uses == "evaluate":
            if st.teacher is not None or st.teachers:
                raise ConfigError(
                    f"{where}.teacher: a {st.kind} stage evaluates the models of `evaluate:`; remove the teacher"
                )
            _check_train_keys(st, where)
            if not st.evaluate:
                raise ConfigError(
                    f"{where}.evaluate: empty; map report keys to models, e.g. student_accuracy: {refs[-1] if refs else 'student'}"
                )
            for key, ref in st.evaluate.items():
                _check_derived(cfg, ref, refs, st.name)
                if ref not in refs:
                    raise ConfigError(
                        f"{where}.evaluate.{key}: '{ref}' is neither a model nor an earlier stage; choose one of {refs}"
                    )
        else:  # "teacher": a stage kind that scores with exactly one teacher (precompute)
            if st.teacher is None or st.teacher not in refs:
                raise ConfigError(
                    f"{where}.teacher: a {st.kind} stage scores with one teacher; name a model or an earlier stage from {refs}"
                )
            _check_derived(cfg, st.teacher, refs, st.name)
            if st.task is not None:
                _check_task(st.task, f"{where}.task", TASKS)
        if kind.check is not None:
            try:
                kind.check(st)
            except ValueError as e:
                raise ConfigError(f"{where}.{e}") from None
        seen.append(st.name)


def _section(cls: type, value: Any, path: str) -> Any:
    """A stage's `rollout:` / `eval:` mapping as the adapter's dataclass (already one: kept)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping of {cls.__name__} fields, got {value!r}")
    try:
        return from_dict(cls, value, path)
    except ValueError as e:  # a range check in the dataclass's __post_init__
        raise ConfigError(f"{path}.{e}") from None


def _validate_train_stage(
    cfg: RunConfig, st: StageConfig, refs: list[str], where: str, spec: Any, OBJECTIVES: Any
) -> None:
    if st.student is None:
        raise ConfigError(f"{where}.student: missing; name a model from 'models' or an earlier stage")
    for role in ("student", "teacher", "anchor"):
        ref = st.__dict__[role]
        if ref is not None and ref not in refs:
            raise ConfigError(f"{where}.{role}: '{ref}' is neither a model nor an earlier stage; choose one of {refs}")
        if ref is not None:
            _check_derived(cfg, ref, refs, st.name)
    for tag, ref in st.teachers.items():
        if ref not in refs:
            raise ConfigError(
                f"{where}.teachers.{tag}: '{ref}' is neither a model nor an earlier stage; choose one of {refs}"
            )
        _check_derived(cfg, ref, refs, st.name)
    if st.teachers and not spec.supports_routing:
        raise ConfigError(
            f"{where}.teachers: adapter '{cfg.adapter}' does not route prompts to several teachers; use {where}.teacher"
        )
    if st.teacher is not None and st.teachers:
        raise ConfigError(f"{where}: give either 'teacher' (one model) or 'teachers' (routing tag -> model), not both")
    obj = dict(st.objective)
    otype = obj.pop("type", None)
    if otype is None:
        raise ConfigError(f"{where}.objective.type: missing; choose one of {', '.join(OBJECTIVES.names())}")
    if not isinstance(otype, str):
        raise ConfigError(
            f"{where}.objective.type: expected a name, got {otype!r}; choose one of {', '.join(OBJECTIVES.names())}"
        )
    if otype not in OBJECTIVES:
        if f"objective:{otype}" in RENAMED:
            raise ConfigError(
                f"{where}.objective.type: '{otype}' is no longer an objective: {RENAMED['objective:' + otype]}"
            )
        close = difflib.get_close_matches(otype, OBJECTIVES.names(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(OBJECTIVES.names())}"
        raise ConfigError(f"{where}.objective.type: unknown objective '{otype}'; {hint}")
    obj_cls = OBJECTIVES.get(otype)
    try:  # building it is cheap and checks value ranges before any stage runs
        objective = obj_cls(**check_kwargs(obj_cls, obj, f"{where}.objective"))
    except ValueError as e:
        raise ConfigError(f"{where}.{e}") from None
    needs = objective.needs
    if needs.teacher and st.teacher is None and not st.teachers:
        raise ConfigError(
            f"{where}.teacher: objective '{otype}' needs a teacher; set {where}.teacher (or {where}.teachers)"
        )
    if needs.anchor and st.anchor is None:
        raise ConfigError(
            f"{where}.anchor: objective '{otype}' with mar_coef > 0 needs an anchor model; set {where}.anchor or mar_coef=0"
        )
    if needs.sampled_actions and st.rollout.temperature <= 0:
        raise ConfigError(
            f"{where}.rollout.temperature: '{otype}' learns from sampled tokens and needs temperature > 0"
        )
    micro = st.train.micro_batch_size
    if needs.whole_groups and micro is not None and micro % st.rollout.group_size:
        raise ConfigError(
            f"{where}.train.micro_batch_size={micro}: objective '{otype}' normalises over whole prompt groups; "
            f"set it to a multiple of rollout.group_size={st.rollout.group_size}"
        )
    _check_train_keys(st, where)


def _check_tracker(name: str) -> None:
    """The tracker's package is installed (checked before any compute)."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"tracker: '{name}' needs the {module} package; pip install {module} (or drop tracker=)")


def _check_derived(cfg: RunConfig, ref: str, refs: list[str], stage: str) -> None:
    """A pruned or merged model may only use models and stages that exist before `stage`."""
    m = cfg.models.get(ref)
    if m is None:
        return
    sources = [m.prune.source] if m.prune is not None else list(m.merge.sources) if m.merge is not None else []
    for src in sources:
        kind = "prune.source" if m.prune is not None else "merge.sources"
        if src not in refs:
            raise ConfigError(
                f"models.{ref}.{kind}: '{src}' is not a model or a stage before '{stage}'; choose one of {refs}"
            )
        _check_derived(cfg, src, refs, stage)


def _check_train_keys(st: StageConfig, where: str) -> None:
    for key, low in (
        ("steps", 0),
        ("batch_size", 1),
        ("micro_batch_size", 1),
        ("log_every", 1),
        ("chunk_size", 1),
        ("teacher_batch_size", 1),
        ("max_nonfinite_steps", 1),
        ("updates_per_rollout", 1),
        ("minibatch_size", 1),
        ("replay_rounds", 0),
        ("rollout_shards", 1),
        ("save_every", 0),
        ("eval_every", 0),
        ("lr", 0.0),
    ):
        value = st.train.__dict__[key]
        if value is not None and value < low:
            raise ConfigError(f"{where}.train.{key}: {value} is below the smallest allowed value {low}")
    if st.train.stop_at and not st.train.eval_every:
        raise ConfigError(f"{where}.train.stop_at needs train.eval_every > 0 (the metrics are read at each evaluation)")
    if not 0.0 <= st.train.min_lr_ratio <= 1.0:
        raise ConfigError(f"{where}.train.min_lr_ratio must lie in [0, 1]; got {st.train.min_lr_ratio}")
    if st.train.micro_batch_size is not None and st.train.batch_size % st.train.micro_batch_size:
        raise ConfigError(
            f"{where}.train.micro_batch_size={st.train.micro_batch_size} must divide train.batch_size={st.train.batch_size}"
        )
    mb = st.train.minibatch_size
    if mb is not None and (st.train.batch_size % mb or mb % st.rollout.group_size):
        raise ConfigError(
            f"{where}.train.minibatch_size={mb} must divide train.batch_size={st.train.batch_size} and be a multiple "
            f"of rollout.group_size={st.rollout.group_size}"
        )
    if st.train.batch_size % st.rollout.group_size:
        raise ConfigError(
            f"{where}.train.batch_size={st.train.batch_size} must be a multiple of rollout.group_size={st.rollout.group_size}"
        )


def _check_task(task: dict, where: str, TASKS: Any) -> None:
    args = dict(task)
    ttype = args.pop("type", None)
    if not isinstance(ttype, str) or ttype not in TASKS:
        raise ConfigError(f"{where}.type: unknown task {ttype!r}; known: {', '.join(TASKS.names())}")
    check_kwargs(TASKS.get(ttype), args, where)
    if "path" in args and not Path(args["path"]).exists():
        raise ConfigError(f"{where}.path: file '{args['path']}' does not exist; fix {where}.path")


def _looks_local(path: str) -> bool:
    """Hub ids look like 'org/name'; anything starting with '.', '/' or '~', or existing, is local."""
    return path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1] or path.count("/") > 1


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: RunConfig, path: Path) -> None:
    from mmdistill.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
