"""Test-wide settings: tiny models run fastest on one thread (no pool wake-ups per small op)."""

import torch

torch.set_num_threads(1)
