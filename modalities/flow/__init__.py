"""Flow modality: flow-matching image models (diffusers SD3-style transformers with
FlowMatchEulerDiscreteScheduler), SDE sampling with per-step log-probs, and the
synthetic `shapes` text-to-image task.

- `sde`:       sigma schedules, the Flow-GRPO SDE step and its log-prob, w(t), the
               sampling loop that returns a `Rollout`, re-scoring any velocity model.
- `pipelines`: tiny random-init SD3 pipelines built offline, CFG velocity, save/load.
- `shapes`:    procedurally generated prompts, a numpy renderer and pixel rewards.

    python -m pytest tests/test_flow_sde.py tests/test_flow_objectives.py tests/test_flow_shapes.py -q -o addopts=""
"""
