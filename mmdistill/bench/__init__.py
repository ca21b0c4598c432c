"""Benchmarks, one file each; every one is a function returning a JSON-able dict that
`mmdistill bench NAME` writes (and, where `PLOTS` has NAME, a PNG beside it).

- `flow_sampling`:      SDE sampling with log-probs against diffusers' Euler loop
- `libero_throughput`:  LIBERO environment steps per second, 1 vs N workers, render at decisions vs every step
- `text_step`:          one on-policy reverse-KL distillation step against TRL's GKDTrainer
- `text_loss_memory`:   peak memory and time of the reverse-KL loss at Qwen's vocabulary
- `memory`:             GPU memory per device of the standard pairs under DDP / FSDP / ZeRO, from exact meta-device counts
- `common`:             device, timing, resident memory and profiling helpers they share

Benchmarks may name modalities; like every part of the core they never import an objective's
module (the `reverse_kl` objective is taken from the registry).

    mmdistill bench text-step --quick --out /tmp/text-step.json
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmdistill.bench import flow_sampling, libero_throughput, memory, text_loss_memory, text_step

# The package's attributes stay the modules (`mmdistill.bench.text_step` is the file); the dicts hold the functions.
BENCHES: dict[str, Callable[..., dict[str, Any]]] = {
    "flow-sampling": flow_sampling.flow_sampling,
    "libero-throughput": libero_throughput.libero_throughput,
    "text-step": text_step.text_step,
    "text-loss-memory": text_loss_memory.text_loss_memory,
    "memory": memory.memory,
}
PLOTS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "text-step": text_step.plot_text_step,
    "text-loss-memory": text_loss_memory.plot_loss_memory,
}
