"""LeRobot 0.3.2 policies (ACT, Diffusion, SmolVLA) behind mmdistill's robot policy interface.

Observations are dicts with LeRobot key names; in a rollout every value has leading dims `[B, T]`
(`observation.state` [B, T, S], `observation.images.image` uint8 [B, T, 3, H, W], `task` list[str]
of length B).  Actions are chunks of K = `chunk_size` actions in environment units, flattened to
D = K * A.  One file per policy, plus what they share:

- `act.py`:       `ACTGaussianPolicy`: `dist` = Gaussian(ACT's first K predicted actions, exp(log_std)),
                  with a learnable state-independent `log_std` [K * A]; `tiny_act`.
- `diffusion.py`: `DiffusionPolicyWrapper`: acts with Diffusion Policy's own DDPM/DDIM sampler and
                  trains through its own loss; no per-decision density, so `dist` refuses; `tiny_diffusion`.
- `smolvla.py`:   `SmolVLAFlowPolicy`: SmolVLA's flow-matching action expert sampled with the
                  Flow-GRPO SDE of `mmdistill/sde.py`; `step_dist` re-scores a denoising chain;
                  `smolvla_sigmas`, `tiny_smolvla`, `write_tiny_smolvlm`.
- `common.py`:    observation batches, normalisation statistics, the wrapper base class, compatibility
                  checks, `load_lerobot_policy` / `save_lerobot_policy` (LeRobot's own
                  `from_pretrained` / `save_pretrained` format, the wrapper's extra parameters such as
                  `log_std` beside it, compatibility checks first).

The inner LeRobot policy always stays in eval mode (dropout off, ACT's latent at the prior mean):
`dist` is then a deterministic function of the observation, so the log-probs a rollout records are
the ones re-scoring computes.  Gradients flow all the same.  LeRobot's `Unnormalize` runs under
`torch.no_grad`; the Gaussian mean is unnormalised here with the policy's own statistics buffers so
that its gradient reaches the network.  lerobot itself is imported lazily (an optional, heavy
dependency): this package imports without it.

    python -m pytest tests/test_robot_lerobot.py -q -o addopts=""
"""

from mmdistill.modalities.robot.lerobot.act import ACTGaussianPolicy, tiny_act
from mmdistill.modalities.robot.lerobot.common import (
    IMAGE_KEY,
    WRAPPER_CONFIG,
    WRAPPER_WEIGHTS,
    WRAPPERS,
    LeRobotWrapper,
    Stats,
    check_compatible,
    check_normalization_stats,
    flatten_time,
    load_lerobot_policy,
    save_lerobot_policy,
    set_normalization_stats,
)
from mmdistill.modalities.robot.lerobot.diffusion import DiffusionPolicyWrapper, tiny_diffusion
from mmdistill.modalities.robot.lerobot.smolvla import (
    SmolVLAFlowPolicy,
    smolvla_sigmas,
    tiny_smolvla,
    write_tiny_smolvlm,
)

__all__ = [
    "IMAGE_KEY",
    "WRAPPER_CONFIG",
    "WRAPPER_WEIGHTS",
    "WRAPPERS",
    "Stats",
    "LeRobotWrapper",
    "ACTGaussianPolicy",
    "DiffusionPolicyWrapper",
    "SmolVLAFlowPolicy",
    "flatten_time",
    "set_normalization_stats",
    "check_normalization_stats",
    "check_compatible",
    "load_lerobot_policy",
    "save_lerobot_policy",
    "smolvla_sigmas",
    "tiny_act",
    "tiny_diffusion",
    "tiny_smolvla",
    "write_tiny_smolvlm",
]
