"""Text modality: HF causal LMs (any `from_pretrained` checkpoint or a tiny random-init one)
and verifiable math tasks.

    mmdistill train configs/text/quickstart.yaml
"""
