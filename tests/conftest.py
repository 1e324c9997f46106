"""Shared test setup. Without a GPU, Triton kernels run through Triton's interpreter; the
variable must be set before anything imports triton."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def demo_greeter(tmp_path_factory):
    """The demo task's NoRA adapter (nora_runtime.training.demo_task), trained once per session:
    the tiny test model answers greetings with "nora" through it."""
    from nora_runtime.training import demo_task

    return demo_task.train_demo_adapter(tmp_path_factory.mktemp("demo"))
