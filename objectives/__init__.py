"""mmdistill.objectives: the math of every objective, on tensors and step distributions.

No model loading and no I/O here; one algorithm per file; every loss returns
`(loss, metrics)`.  Import it as `mmdistill.objectives`:

    python -c "from mmdistill.objectives import generalized_jsd"
"""
if __name__ != "mmdistill.objectives":  # imported by its bare folder name
    raise ImportError(
        "the folder 'objectives' is shipped as 'mmdistill.objectives'; "
        "write `from mmdistill.objectives import ...` (and install the project with `pip install -e .`)"
    )
