"""The time bound on grid-barrier waits (lstm_kernels/backends/barrier_bound.py): the bound the launch
code passes to the kernels, verification's, and how the host learns of a wait that gave up."""
import pytest
import torch

from lstm_kernels import backends as backends_mod
from lstm_kernels.backends import barrier_bound
from lstm_kernels.function import lstm_layer

from test_verification import _inputs, fakes  # noqa: F401  (the fixture)

NS = 10**9


def test_grid_barriers_are_bounded_tighter_while_a_plan_is_verified(fakes, monkeypatch):
    seen = []
    original = fakes["right"].forward

    def forward(*args):
        seen.append((barrier_bound.barrier_timeout_ns(), barrier_bound.checks_at_once()))
        return original(*args)

    monkeypatch.setattr(fakes["right"], "forward", forward)
    monkeypatch.delenv(backends_mod.BARRIER_TIMEOUT_ENV, raising=False)
    lstm_layer(*_inputs(), backend="right")
    # verification's run (its bound, checked at once), then the call's own (the default, checked later)
    assert seen == [(barrier_bound.VERIFY_BARRIER_TIMEOUT_S * NS, True),
                    (barrier_bound.DEFAULT_BARRIER_TIMEOUT_S * NS, False)]
    assert barrier_bound.VERIFY_BARRIER_TIMEOUT_S < barrier_bound.DEFAULT_BARRIER_TIMEOUT_S
    with barrier_bound.bounded_barriers(0.25):
        assert barrier_bound.barrier_timeout_ns() == NS // 4
    assert barrier_bound.barrier_timeout_ns() == barrier_bound.DEFAULT_BARRIER_TIMEOUT_S * NS
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="bounded_barriers"):
            with barrier_bound.bounded_barriers(bad):
                pass


def test_the_bound_is_seconds_from_the_environment(monkeypatch):
    env = barrier_bound.BARRIER_TIMEOUT_ENV
    monkeypatch.delenv(env, raising=False)
    assert barrier_bound.barrier_timeout_s() == barrier_bound.DEFAULT_BARRIER_TIMEOUT_S == 10.0
    for value, ns in (("0", 0), ("2.5", 2_500_000_000), (" 30 ", 30 * NS), ("1e-9", 1), ("1e-12", 1), ("", 10 * NS)):
        monkeypatch.setenv(env, value)
        assert barrier_bound.barrier_timeout_ns() == ns, value
    for bad in ("-3", "ten", "nan", "inf", "1s"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=env):
            barrier_bound.barrier_timeout_ns()


class _Event:
    """A CUDA event stand-in: landed or not, and whether anyone waited on it."""

    def __init__(self, landed=True):
        self.landed, self.waited = landed, False

    def query(self):
        return self.landed

    def synchronize(self):
        self.waited, self.landed = True, True


@pytest.fixture
def records(monkeypatch):
    """Fresh module state; copies of records as in _copy_back, with controllable events."""
    monkeypatch.setattr(barrier_bound, "_RECORDS", {})
    monkeypatch.setattr(barrier_bound, "_PENDING", {})
    events = []

    def copy_back(record):
        events.append(_Event(landed=False))
        return barrier_bound._Copy(events[-1], record.clone())

    monkeypatch.setattr(barrier_bound, "_copy_back", copy_back)
    return events


def _give_up(record, kernel, step, block, waited_ns=3 * NS):
    record.copy_(torch.tensor([barrier_bound.kernel_code(kernel), step, block, waited_ns]))


def test_a_give_up_raises_at_the_next_call_once_its_copy_has_landed(records):
    dev = torch.device("cpu")
    record = barrier_bound.device_record(dev)
    assert record.tolist() == [0, 0, 0, 0] and barrier_bound.device_record(dev) is record  # one per device
    barrier_bound.after_launch(dev, record)  # a launch that passed
    records[-1].landed = True
    barrier_bound.raise_if_gave_up(dev)  # nothing to report
    _give_up(record, "cuda fused backward (persistent)", 17, 5)
    barrier_bound.after_launch(dev, record)
    barrier_bound.raise_if_gave_up(dev)  # the copy has not landed: no sync, no error yet
    assert not records[-1].waited
    records[-1].landed = True
    with pytest.raises(RuntimeError, match=r"cuda fused backward \(persistent\) kernel on cpu gave up after waiting "
                                           r"3 s \(block 5, waiting after step 17\).*outputs of the call that "
                                           r"launched it are invalid"):
        barrier_bound.raise_if_gave_up(dev)
    assert record.tolist() == [0, 0, 0, 0]  # cleared: reported once
    barrier_bound.raise_if_gave_up(dev)


def test_only_the_newest_copies_are_kept(records):
    dev = torch.device("cpu")
    record = barrier_bound.device_record(dev)
    for _ in range(barrier_bound.MAX_PENDING + 3):
        barrier_bound.after_launch(dev, record)
    assert [c.event for c in barrier_bound._PENDING[dev]] == records[-barrier_bound.MAX_PENDING:]


def test_bounded_barriers_check_at_once(records):
    dev = torch.device("cpu")
    record = barrier_bound.device_record(dev)
    _give_up(record, "triton backward (persistent, step budget)", 0, 95)
    with barrier_bound.bounded_barriers(1.0):
        with pytest.raises(RuntimeError, match=r"triton backward \(persistent, step budget\).*block 95"):
            barrier_bound.after_launch(dev, record)
    assert records[-1].waited and record.tolist() == [0, 0, 0, 0]


def test_nothing_is_copied_or_queried_under_graph_capture(records, monkeypatch):
    dev = torch.device("cpu")
    record = barrier_bound.device_record(dev)
    _give_up(record, "cuda fused forward (persistent)", 2, 1)
    monkeypatch.setattr(barrier_bound, "_capturing", lambda device: True)
    barrier_bound.after_launch(dev, record)
    assert records == [] and barrier_bound._PENDING == {}
    barrier_bound._PENDING[dev] = [barrier_bound._Copy(_Event(), record.clone())]
    barrier_bound.raise_if_gave_up(dev)  # not under capture
    monkeypatch.setattr(barrier_bound, "_capturing", lambda device: False)
    with pytest.raises(RuntimeError, match=r"cuda fused forward \(persistent\)"):  # the sticky record: the next eager look
        barrier_bound.raise_if_gave_up(dev)


def test_every_kernel_code_names_its_kernel():
    assert [barrier_bound.kernel_code(k) for k in barrier_bound.KERNELS] == list(range(1, len(barrier_bound.KERNELS) + 1))
    assert "unknown kernel (code 99)" in barrier_bound.describe("cpu", 99, 0, 0, 0)
