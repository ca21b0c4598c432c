"""Registers the text tasks by their YAML names (`task: {type: arith, ...}`)."""
from mmdistill.modalities.text.tasks.arith import ArithTask
from mmdistill.modalities.text.tasks.jsonl_math import JsonlMathTask
from mmdistill.modalities.text.tasks.mixture import MixtureTask
from mmdistill.registry import TASKS

TASKS.register("arith")(ArithTask)
TASKS.register("jsonl_math")(JsonlMathTask)
TASKS.register("mixture")(MixtureTask)
