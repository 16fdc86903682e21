"""Test-wide settings: tiny models run fastest on one thread (no pool wake-ups per small op), and
the compile cache is a folder of this run's own (a server compiles by default when the cache holds
a finished build for its model: one left in the user's cache must not change what a test runs).
Tests marked `slow` (compiles, the interpreted kernels, whole servers started as commands:
ten seconds to minutes each on a CPU) run only with FASTCSM_SLOW_TESTS=1, which CI sets;
otherwise each is reported as skipped."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)
os.environ["FASTCSM_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fastcsm-test-compile-")
atexit.register(shutil.rmtree, os.environ["FASTCSM_COMPILE_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTCSM_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="slow (compiles, interprets kernels, starts servers); set FASTCSM_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_csm_dir(tmp_path_factory):
    """A tiny random transformers-format CSM on disk: model, tiny Mimi under `codec_model.*`,
    byte tokenizer. Written once per run and shared by the modules that load it from disk."""
    pytest.importorskip("transformers")
    from fastcsm.testing import write_hf_checkpoint

    root = tmp_path_factory.mktemp("tiny_csm")
    write_hf_checkpoint(root, seed=0)
    return root
