"""`processes.side_by_side`: two pieces of work at once, the second in a fork."""
import os
import signal
import time

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.processes import side_by_side


def test_both_results_come_back_and_the_fork_ran_elsewhere_on_one_thread():
    here, there = side_by_side(lambda: (os.getpid(), torch.get_num_threads()),
                               lambda: (os.getpid(), torch.get_num_threads(), {"a": [1, 2]}))
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: the two run one after the other")
    assert here[0] == os.getpid() and there[0] != os.getpid()
    assert here[1] == 1 and there[1] == 1 and there[2] == {"a": [1, 2]}


def test_threads_are_given_back_after():
    before = torch.get_num_threads()
    side_by_side(lambda: None, lambda: None)
    assert torch.get_num_threads() == before


def test_the_forks_user_error_is_raised_here_as_itself():
    def refuse():
        raise UserError("evaluate.x=1 is wrong; set it to 2")

    with pytest.raises(UserError) as caught:
        side_by_side(lambda: None, refuse)
    assert str(caught.value) == "evaluate.x=1 is wrong; set it to 2"  # the one line run_cli prints
    assert any("in the forked process" in note for note in caught.value.__notes__)  # with its traceback


def test_a_fork_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="SIGKILL"):
        side_by_side(lambda: None, lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_when_this_side_fails_the_fork_is_ended():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: nothing is forked")
    seen, before = [], _children()  # (a child an earlier test left, such as multiprocessing's resource tracker: not ours)

    def fail():
        time.sleep(0.2)
        seen.extend(_children() - before)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        side_by_side(fail, lambda: time.sleep(60))
    assert seen and all(not os.path.exists(f"/proc/{pid}") for pid in seen)  # killed and reaped at once


def _children() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == os.getpid()}


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None
