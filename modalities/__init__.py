"""mmdistill.modalities: adapters that know a model family, and the tasks of each modality.

Import it as `mmdistill.modalities`:

    python -c "import mmdistill.modalities.text"
"""
if __name__ != "mmdistill.modalities":  # imported by its bare folder name
    raise ImportError(
        "the folder 'modalities' is shipped as 'mmdistill.modalities'; "
        "write `from mmdistill.modalities import ...` (and install the project with `pip install -e .`)"
    )
