"""Robot modality: environments, policies with Gaussian / categorical / flow step distributions, and the
`robot_policy` adapter (students act in the environment, teachers score the visited states).

- `envs`:      the environment protocol, fixed initial states split train / eval, the built-in
               point-mass reaching environment (fast tests, CPU demos).
- `policies`:  a Gaussian MLP and a small vision student, privileged scripted experts.
- `lerobot/`:  LeRobot policies (ACT, Diffusion, SmolVLA), one file each, plus their shared I/O.
- `tokenized`: an OpenVLA-style policy whose actions are LM tokens (re-scored by the text adapter).
- `libero`, `vec`, `record`: LIBERO simulations, environment worker processes, LeRobot datasets.
- `config`:    the adapter's `rollout:`, `eval:` and `models.NAME.tiny` sections.
- `task`:      the `reach` and `libero` tasks; `adapter`: rollouts, re-scoring, evaluation, recording.

Importing this package registers the adapter and the tasks.

    mmdistill train configs/vla/pointmass_opd.yaml
"""

from mmdistill.modalities.robot import adapter, task

__all__ = ["adapter", "task"]
