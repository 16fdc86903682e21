"""Test-wide settings: tiny models run fastest on one thread (no pool wake-ups per small op)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_csm_dir(tmp_path_factory):
    """A tiny random transformers-format CSM on disk: model, tiny Mimi under `codec_model.*`,
    byte tokenizer. Written once per run and shared by the modules that load it from disk."""
    pytest.importorskip("transformers")
    from fastcsm.testing import write_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny_csm")
    write_hf_checkpoint(root, seed=0)
    return root
