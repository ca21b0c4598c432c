"""mmdistill.modalities: adapters that know a model family, and the tasks of each modality.

Import it as `mmdistill.modalities`:

    python -c "import mmdistill.modalities.text"
"""

if __name__ != "mmdistill.modalities":  # imported by its bare folder name
    raise ImportError(
        "the folder 'modalities' is shipped as 'mmdistill.modalities'; "
        "write `from mmdistill.modalities import ...` (and install the project with `pip install -e .`)"
    )

# Each modality registers its adapter, tasks, teacher kinds and stage kinds when its package is imported.
from mmdistill.modalities import robot, text  # noqa: E402, F401

try:  # the flow extra (diffusers) is optional
    from mmdistill.modalities import flow  # noqa: E402, F401
except ImportError as e:  # pragma: no cover - only without the flow extra
    if "diffusers" not in str(e):
        raise
