"""Flow modality: flow-matching image models (diffusers SD3 / Flux transformers with
FlowMatchEulerDiscreteScheduler), SDE rollouts with per-step log-probs (`mmdistill/sde.py`),
and text-to-image tasks.

- `adapter`:   the `diffusers_flow` adapter (load, sample, re-score, route teachers, evaluate, save).
- `config`:    its `rollout:` / `eval:` sections and the tiny random-init pipeline config.
- `pipelines`: tiny random-init SD3 / Flux pipelines built offline, CFG velocity, save/load.
- `task`:      the `shapes` task (routing tags, rendered images, pixel rewards) and `t2i_prompts`.
- `shapes`:    procedurally generated prompts, a numpy renderer and pixel rewards.
- `rewards`:   image rewards (a CLIP score through open_clip).

Importing this package registers the adapter and the tasks.

    mmdistill train configs/flow/shapes_flow_opd.yaml
"""

from mmdistill.modalities.flow import adapter, rewards, task  # noqa: F401  (adapter and tasks register themselves)
