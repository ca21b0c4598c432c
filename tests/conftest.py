"""Shared fixtures: tiny configs, a word tokenizer, tiny models (CPU, fp32)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_RAW = {
    "run_dir": "runs/test",
    "seed": 0,
    "device": "cpu",
    "task": {"type": "arith", "difficulty": 1, "max_value": 9},
    "models": {
        "teacher_init": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seed": 1}},
        "student": {"tiny": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seed": 2}},
    },
    "eval": {"n": 8, "batch_size": 8, "max_new_tokens": 12},
    "rollout": {"max_new_tokens": 12},
    "stages": [
        {
            "name": "teacher_sft",
            "student": "teacher_init",
            "objective": {"type": "sft"},
            "train": {"steps": 4, "batch_size": 8, "lr": 0.003, "save_every": 2, "log_every": 1},
        },
        {
            "name": "student_opd",
            "student": "student",
            "teacher": "teacher_sft",
            "objective": {"type": "reverse_kl"},
            "train": {"steps": 4, "batch_size": 8, "lr": 0.003, "save_every": 2, "log_every": 1},
        },
        {
            "name": "evaluate",
            "kind": "eval",
            "evaluate": {
                "teacher_accuracy": "teacher_sft",
                "student_accuracy_before": "student",
                "student_accuracy_after": "student_opd",
            },
        },
    ],
}


@pytest.fixture
def tiny_raw(tmp_path):
    raw = copy.deepcopy(TINY_RAW)
    raw["run_dir"] = str(tmp_path / "run")
    return raw


@pytest.fixture(scope="session")
def word_tokenizer():
    from mmdistill.modalities.text.tasks.arith import ArithTask
    from mmdistill.modalities.text.tokenizer import build_word_tokenizer

    return build_word_tokenizer(ArithTask(difficulty=1, max_value=9).vocabulary())
