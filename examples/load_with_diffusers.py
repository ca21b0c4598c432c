"""Load a flow pipeline saved by mmdistill with plain diffusers (no mmdistill import) and draw one image.

    python examples/load_with_diffusers.py runs/shapes_flow_opd/flow_opd/final \
        "a red circle on the left of a blue square" sample.png
"""

import sys

import torch
from diffusers import DiffusionPipeline

ckpt, prompt = sys.argv[1], sys.argv[2]
out = sys.argv[3] if len(sys.argv) > 3 else "sample.png"
pipe = DiffusionPipeline.from_pretrained(ckpt)
pipe.set_progress_bar_config(disable=True)
kwargs = {}
t5 = getattr(pipe, "text_encoder_3", None)
if t5 is not None and not any(p.any() for p in t5.parameters()):
    # an all-zero T5 is mmdistill's stand-in for "no T5": the run conditioned on the CLIP encoders
    # alone, so drop it and ask for no T5 tokens (diffusers would append 256 zero ones)
    pipe = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    kwargs["max_sequence_length"] = 0
generator = torch.Generator().manual_seed(0)
image = pipe(prompt, num_inference_steps=10, guidance_scale=1.0, generator=generator, **kwargs).images[0]
image.save(out)
print(f"{out}: {image.size[0]}x{image.size[1]} {image.mode}")
