"""The thread policy: a count asked for is kept; otherwise one thread for a small model and every
usable core for a large one; pool threads sleep unless the environment says otherwise."""

from fastcsm import threads
from fastcsm.model.config import preset


def test_a_count_asked_for_is_kept():
    assert threads.choose(3) == 3 and threads.choose(1, preset("csm-1b").param_count()) == 1


def test_small_models_run_on_one_thread_and_large_ones_on_every_usable_core():
    import os

    assert threads.choose(0, preset("tiny").param_count()) == 1
    assert threads.choose(0, preset("csm-1b").param_count()) == threads.usable_cores() == len(os.sched_getaffinity(0))
    assert threads.choose(0) == threads.usable_cores()


def test_pool_threads_sleep_unless_told_otherwise():
    env = {}
    threads.quiet_pool(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    threads.quiet_pool(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_the_fastcsm_command_can_set_the_wait_policy_before_torch_loads():
    """`import fastcsm.cli` (what the `fastcsm` script does first) must not load torch: OpenMP
    reads OMP_WAIT_POLICY once, when torch loads, and `main` sets it first."""
    import subprocess
    import sys

    code = "import sys, fastcsm.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
