"""The wall-clock limit around third-party work that can run away."""

import threading

import pytest

from slimkit.core.errors import SlimkitError
from slimkit.core.time_limit import TimeLimitExceeded, time_limit


def _spin() -> None:
    while True:
        pass


def test_work_past_the_limit_raises_one_line_with_the_fix():
    with pytest.raises(TimeLimitExceeded, match=r"^tracing did not finish within 0.2 s — ignore it$"):
        with time_limit(0.2, "tracing", "ignore it"):
            _spin()
    assert issubclass(TimeLimitExceeded, SlimkitError)


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_no_limit_when_none_is_asked(seconds):
    with time_limit(seconds, "x", "y"):
        total = sum(range(1000))
    assert total == 499500


def test_outside_the_main_thread_the_block_runs_unlimited():
    seen = []

    def work() -> None:
        with time_limit(0.01, "x", "y"):
            seen.append(sum(range(10 ** 6)))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [499999500000]
