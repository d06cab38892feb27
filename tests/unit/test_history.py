"""EpochHistory: where each epoch begins, and where two logs stop agreeing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.core.history import EpochHistory


def history_of(epochs: list[int]) -> EpochHistory:
    """The history of a log whose entry ``i + 1`` has epoch ``epochs[i]``."""
    h = EpochHistory()
    for i, e in enumerate(epochs, start=1):
        h.record(e, i)
    return h


def brute_match(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two logs' epochs."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_empty_history() -> None:
    h = EpochHistory()
    assert h.pairs() == ()
    assert h.epoch_at(0) == 0
    assert h.epoch_at(100) == 0
    assert h.match(0, EpochHistory(), 0) == 0


def test_record_keeps_only_the_first_index_of_each_epoch() -> None:
    h = history_of([1, 1, 1, 3, 3, 7])
    assert h.pairs() == ((1, 1), (3, 4), (7, 6))
    assert [h.epoch_at(i) for i in range(0, 9)] == [0, 1, 1, 1, 3, 3, 7, 7, 7]


def test_constructor_takes_pairs() -> None:
    h = EpochHistory([(1, 1), (3, 4)])
    assert h.pairs() == ((1, 1), (3, 4))
    assert h.epoch_at(3) == 1 and h.epoch_at(4) == 3
    assert "EpochHistory" in repr(h)


@pytest.mark.parametrize(("epoch", "index"), [(2, 10), (5, 4), (5, 3)])
def test_record_rejects_going_backwards(epoch: int, index: int) -> None:
    h = EpochHistory([(3, 1), (4, 4)])
    with pytest.raises(ValueError):
        h.record(epoch, index)
    assert h.pairs() == ((3, 1), (4, 4))


def test_truncate_after() -> None:
    h = history_of([1, 1, 2, 2, 5, 5])
    h.truncate_after(4)
    assert h.pairs() == ((1, 1), (2, 3))
    h.truncate_after(3)
    assert h.pairs() == ((1, 1), (2, 3))
    h.truncate_after(2)
    assert h.pairs() == ((1, 1),)
    h.record(9, 3)
    assert h.pairs() == ((1, 1), (9, 3))
    h.truncate_after(0)
    assert h.pairs() == ()


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [], 0),
        ([1, 1], [], 0),
        ([1, 1, 1], [1, 1], 2),
        ([1, 1, 2, 2], [1, 1, 3], 2),
        ([1, 1, 1, 1], [1, 1, 2, 2], 2),
        ([1, 2, 2], [1, 3, 3], 1),
        ([1], [2], 0),
        ([0, 0], [1], 0),
        ([0, 0, 2], [0, 0, 3, 3], 2),
        ([1, 1, 4, 4, 4], [1, 1, 2, 3, 5], 2),
        ([1, 2, 3, 4], [1, 2, 3, 4, 4, 6], 4),
    ],
)
def test_match_examples(a: list[int], b: list[int], expected: int) -> None:
    assert history_of(a).match(len(a), history_of(b), len(b)) == expected
    assert history_of(b).match(len(b), history_of(a), len(a)) == expected


@st.composite
def diverged_logs(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    """Two logs of one true history: a shared prefix, then one suffix each, written by
    masters of different epochs (so the suffixes use disjoint sets of epochs)."""
    prefix = sorted(draw(st.lists(st.integers(0, 6), max_size=12)))
    floor = prefix[-1] if prefix else 0
    pool = draw(st.lists(st.integers(floor, floor + 12), unique=True, max_size=8))
    split = draw(st.integers(0, len(pool)))
    epochs_a, epochs_b = pool[:split], pool[split:]

    def suffix(epochs: list[int]) -> list[int]:
        if not epochs:
            return []
        chosen = sorted(draw(st.lists(st.sampled_from(epochs), max_size=10)))
        return chosen

    sa, sb = suffix(epochs_a), suffix(epochs_b)
    # the disjoint epoch sets make the first entries after the prefix differ
    assert not (sa and sb and sa[0] == sb[0])
    return prefix + sa, prefix + sb, len(prefix)


@settings(max_examples=600, deadline=None)
@given(diverged_logs())
def test_match_agrees_with_brute_force(logs: tuple[list[int], list[int], int]) -> None:
    a, b, common = logs
    assert brute_match(a, b) == common
    ha, hb = history_of(a), history_of(b)
    assert ha.match(len(a), hb, len(b)) == common
    assert hb.match(len(b), ha, len(a)) == common


@settings(max_examples=300, deadline=None)
@given(diverged_logs(), st.data())
def test_match_after_truncating_one_side(logs: tuple[list[int], list[int], int],
                                          data: st.DataObject) -> None:
    """A slave whose log was cut (or is simply behind) still matches at the right place."""
    a, b, _ = logs
    cut = data.draw(st.integers(0, len(b)))
    hb = history_of(b)
    hb.truncate_after(cut)
    b = b[:cut]
    assert hb.pairs() == history_of(b).pairs()
    ha = history_of(a)
    assert ha.match(len(a), hb, len(b)) == brute_match(a, b)
    assert hb.match(len(b), ha, len(a)) == brute_match(a, b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10), max_size=20).map(sorted), st.data())
def test_epoch_at_and_truncate_agree_with_the_list(epochs: list[int],
                                                   data: st.DataObject) -> None:
    h = history_of(epochs)
    for i, e in enumerate(epochs, start=1):
        assert h.epoch_at(i) == e
    cut = data.draw(st.integers(0, len(epochs)))
    h.truncate_after(cut)
    assert h.pairs() == history_of(epochs[:cut]).pairs()
