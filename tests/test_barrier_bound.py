"""The bound on grid-barrier waits: what the launch code passes to the kernels, and verification's."""
from lstm_kernels import backends as backends_mod
from lstm_kernels.backends import barrier_bound, barrier_spin_limit, bounded_barriers
from lstm_kernels.function import lstm_layer

from test_verification import _inputs, fakes  # noqa: F401  (the fixture)


def test_grid_barriers_are_bounded_while_a_plan_is_verified(fakes, monkeypatch):
    seen = []
    original = fakes["right"].forward

    def forward(*args):
        seen.append(barrier_spin_limit())
        return original(*args)

    monkeypatch.setattr(fakes["right"], "forward", forward)
    monkeypatch.delenv(backends_mod.BARRIER_TIMEOUT_ENV, raising=False)
    lstm_layer(*_inputs(), backend="right")
    assert seen == [barrier_bound.VERIFY_BARRIER_POLLS, 0]  # verification's run, then the call's own
    with bounded_barriers(7):
        assert barrier_spin_limit() == 7
    assert barrier_spin_limit() == 0
