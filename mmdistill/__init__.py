"""mmdistill: teacher-to-student distillation across modalities.

mmdistill train configs/text/quickstart.yaml
"""

__version__ = "0.1.0"
