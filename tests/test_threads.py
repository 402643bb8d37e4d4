"""torch's CPU thread count: chosen from the model unless the user sets it."""

import psutil
import torch

import offload
from offload.config import default_threads
from offload.simulate import load_shape


def test_tiny_experts_get_one_thread_and_large_ones_a_thread_per_core():
    demo = offload.load(None)
    assert default_threads(demo.config) == 1 and torch.get_num_threads() == 1
    assert default_threads(load_shape("mixtral-8x7b")) == (psutil.cpu_count(logical=False) or 1)
    try:
        offload.load(None, threads=2)
        assert torch.get_num_threads() == 2  # an explicit choice wins
    finally:
        torch.set_num_threads(1)
