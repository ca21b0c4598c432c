"""Text modality: HF causal LMs (any `from_pretrained` checkpoint or a tiny random-init one),
verifiable math tasks, and two teacher kinds (`cross_tokenizer`: X-Token projection;
`stored_logits`: Lightning OPD's precomputed top-k, written by the `precompute` stage kind).

Importing the package registers its adapter (`hf_causal_lm`), tasks (`arith`, `jsonl_math`,
`mixture`, `teacher_shards`) and stage kind (`precompute`).

    mmdistill train configs/text/quickstart.yaml
"""

from mmdistill.modalities.text import adapter, engine, harness, precompute, stored_logits, xtoken  # noqa: F401
from mmdistill.modalities.text.tasks import arith, jsonl_math, mixture, teacher_shards  # noqa: F401
