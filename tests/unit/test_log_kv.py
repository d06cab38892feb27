"""The in-memory Log and the KV map that applying it builds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.types import Entry, Op


def put(index: int, key: str, value: str, epoch: int = 1) -> Entry:
    return Entry(index, epoch, 1000 + index, Op.SET, key, value)


def delete(index: int, key: str, epoch: int = 1) -> Entry:
    return Entry(index, epoch, 1000 + index, Op.DELETE, key, None)


def log_of(*epochs: int, base: int = 0, base_epoch: int = 0) -> Log:
    lg = Log(base, base_epoch)
    for i, e in enumerate(epochs, start=base + 1):
        lg.append(put(i, f"k{i}", f"v{i}", e))
    return lg


# --- Log -----------------------------------------------------------------------------------------


def test_empty_log() -> None:
    lg = Log()
    assert (lg.base, lg.last_index, lg.last_epoch, len(lg)) == (0, 0, 0, 0)
    assert lg.epoch_at(0) == 0
    assert lg.slice(1, 10) == []
    with pytest.raises(IndexError):
        lg.get(1)
    with pytest.raises(IndexError):
        lg.get(0)


def test_append_get_and_epochs() -> None:
    lg = log_of(1, 1, 2, 2, 4)
    assert (lg.last_index, lg.last_epoch, len(lg)) == (5, 4, 5)
    assert lg.get(3) == put(3, "k3", "v3", 2)
    assert [lg.epoch_at(i) for i in range(6)] == [0, 1, 1, 2, 2, 4]
    assert lg.history.pairs() == ((1, 1), (2, 3), (4, 5))
    with pytest.raises(IndexError):
        lg.get(6)


def test_append_rejects_gaps_repeats_and_older_epochs() -> None:
    lg = log_of(1, 2)
    with pytest.raises(ValueError):
        lg.append(put(4, "k", "v", 2))
    with pytest.raises(ValueError):
        lg.append(put(2, "k", "v", 2))
    with pytest.raises(ValueError):
        lg.append(put(3, "k", "v", 1))
    assert lg.last_index == 2
    assert lg.history.pairs() == ((1, 1), (2, 2))


def test_slice() -> None:
    lg = log_of(1, 1, 1, 1, 1)
    assert [e.index for e in lg.slice(2, 2)] == [2, 3]
    assert [e.index for e in lg.slice(4, 10)] == [4, 5]
    assert lg.slice(6, 10) == []
    assert lg.slice(1, 0) == []
    with pytest.raises(IndexError):
        lg.slice(0, 1)


def test_truncate_after_returns_the_removed_entries_and_fixes_history() -> None:
    lg = log_of(1, 1, 2, 3, 3)
    removed = lg.truncate_after(3)
    assert [e.index for e in removed] == [4, 5]
    assert lg.last_index == 3 and lg.last_epoch == 2
    assert lg.history.pairs() == ((1, 1), (2, 3))
    assert lg.truncate_after(3) == []
    lg.append(put(4, "x", "y", 5))
    assert lg.history.pairs() == ((1, 1), (2, 3), (5, 4))
    assert lg.epoch_at(4) == 5


def test_truncate_to_zero() -> None:
    lg = log_of(1, 2)
    assert len(lg.truncate_after(0)) == 2
    assert (lg.last_index, lg.last_epoch, lg.history.pairs()) == (0, 0, ())


def test_compact_to() -> None:
    lg = log_of(1, 1, 2, 2, 3)
    lg.compact_to(3)
    assert (lg.base, lg.last_index, len(lg)) == (3, 5, 2)
    assert lg.epoch_at(3) == 2  # the base keeps its epoch
    assert lg.epoch_at(1) == 1  # older ones from the history
    assert not lg.has(3) and lg.has(4)
    with pytest.raises(IndexError):
        lg.get(3)
    with pytest.raises(IndexError):
        lg.slice(3, 1)
    assert lg.get(4).index == 4
    lg.compact_to(2)  # going backwards does nothing
    assert lg.base == 3
    with pytest.raises(IndexError):
        lg.truncate_after(2)
    assert lg.truncate_after(3) == [put(4, "k4", "v4", 2), put(5, "k5", "v5", 3)]
    assert (lg.last_index, lg.last_epoch) == (3, 2)


def test_compact_past_the_end_stops_at_the_last_entry() -> None:
    lg = log_of(1, 2)
    lg.compact_to(10)
    assert (lg.base, lg.last_index, lg.last_epoch, len(lg)) == (2, 2, 2, 0)
    lg.append(put(3, "k", "v", 2))
    assert lg.last_index == 3


def test_compact_everything_then_append() -> None:
    lg = log_of(1, 1, 1)
    lg.compact_to(3)
    assert lg.last_epoch == 1
    with pytest.raises(ValueError):
        lg.append(put(4, "k", "v", 0))
    lg.append(put(4, "k", "v", 1))
    assert lg.slice(4, 5) == [put(4, "k", "v", 1)]


def test_reset() -> None:
    lg = log_of(1, 2, 3)
    lg.reset(10, 4, EpochHistory([(1, 1), (4, 8)]))
    assert (lg.base, lg.last_index, lg.last_epoch, len(lg)) == (10, 10, 4, 0)
    assert lg.epoch_at(10) == 4 and lg.epoch_at(5) == 1
    lg.append(put(11, "k", "v", 4))
    assert lg.last_index == 11


def test_log_with_a_base() -> None:
    lg = log_of(2, 2, base=5, base_epoch=2)
    assert (lg.base, lg.last_index) == (5, 7)
    assert lg.epoch_at(5) == 2


# --- KV ------------------------------------------------------------------------------------------


def test_apply_set_overwrite_delete() -> None:
    kv = KV()
    kv.apply(put(1, "a", "1"))
    kv.apply(put(2, "b", "2"))
    kv.apply(put(3, "a", "3"))
    kv.apply(delete(4, "b"))
    kv.apply(delete(5, "missing"))
    assert kv.data == {"a": "3"}
    assert kv.applied == 5
    assert kv.get("a") == ("3", 3) and kv.get("b") is None


def test_each_key_knows_the_entry_that_last_set_it() -> None:
    kv = KV()
    kv.apply(put(1, "a", "1"))
    kv.apply(put(2, "b", "2"))
    assert kv.indexes == {"a": 1, "b": 2}
    kv.apply(put(3, "a", "again"))  # an overwrite moves the key's index
    assert kv.get("a") == ("again", 3) and kv.get("b") == ("2", 2)
    kv.apply(delete(4, "a"))  # a delete forgets it
    assert kv.get("a") is None and kv.indexes == {"b": 2}
    kv.apply(put(5, "a", "back"))  # set again after a delete: the new entry
    kv.apply(Entry(6, 2, 0, Op.NOOP, "", None))  # a new master's noop changes no key
    kv.apply(delete(7, "never"))
    assert kv.indexes == {"a": 5, "b": 2} and kv.applied == 7
    assert sorted(kv.items()) == [("a", "back", 5), ("b", "2", 2)]


def test_apply_out_of_order_is_refused() -> None:
    kv = KV()
    with pytest.raises(ValueError):
        kv.apply(put(2, "a", "1"))
    kv.apply(put(1, "a", "1"))
    with pytest.raises(ValueError):
        kv.apply(put(1, "a", "2"))
    assert kv.data == {"a": "1"} and kv.applied == 1 and kv.indexes == {"a": 1}


def test_kv_from_a_snapshot_continues_after_it() -> None:
    kv = KV({"x": b"1", "z": "0"}, applied=10, indexes={"x": 4, "z": 9})
    with pytest.raises(ValueError):
        kv.apply(put(1, "a", "1"))
    kv.apply(put(11, "y", "2"))
    assert kv.data == {"x": b"1", "z": "0", "y": "2"}
    assert kv.indexes == {"x": 4, "z": 9, "y": 11}


def test_keys_given_without_indexes_are_taken_as_set_at_the_map_index() -> None:
    """What a map read from a version-1 snapshot knows: no key was set after it."""
    kv = KV({"x": b"1", "y": "2"}, applied=10)
    assert kv.get("x") == (b"1", 10) and kv.indexes == {"x": 10, "y": 10}
    with pytest.raises(ValueError, match="2 keys but 1 key indexes"):
        KV({"x": b"1", "y": "2"}, 10, {"x": 3})


def test_copy_is_independent_and_equal() -> None:
    kv = KV()
    kv.apply(put(1, "a", "1"))
    copy = kv.copy()
    assert copy == kv and copy is not kv
    kv.apply(put(2, "a", "2"))
    assert copy.get("a") == ("1", 1) and copy.applied == 1 and copy != kv
    assert KV({"a": "1"}, 1, {"a": 1}) != KV({"a": "1"}, 1, {"a": 0})  # indexes count
    assert len(kv) == 1


def test_scan_sorted_and_paged() -> None:
    kv = KV({k: k.upper() for k in ["d", "b", "a", "e", "c"]}, applied=5)
    kv.indexes.update(a=1, b=2)

    def items(keys: str) -> list[tuple[str, str, int]]:
        return [(k, k.upper(), kv.indexes[k]) for k in keys]

    assert kv.scan(None, 10) == (items("abcde"), False)
    assert kv.scan(None, 2) == ([("a", "A", 1), ("b", "B", 2)], True)
    assert kv.scan("b", 2) == (items("cd"), True)
    assert kv.scan("c", 2) == (items("de"), False)
    assert kv.scan("e", 2) == ([], False)
    assert kv.scan("bb", 1) == (items("c"), True)
    assert kv.scan(None, 5) == (items("abcde"), False)


def test_scan_stops_early_at_max_bytes_but_returns_at_least_one_item() -> None:
    kv = KV({"a": b"x" * 100, "b": b"y" * 100, "c": b"z" * 100}, applied=3)
    items, more = kv.scan(None, 10, max_bytes=300)  # 136 estimated bytes per item
    assert [k for k, _, _ in items] == ["a", "b"] and more
    items, more = kv.scan(None, 10, max_bytes=1)
    assert [k for k, _, _ in items] == ["a"] and more
    items, more = kv.scan("a", 10, max_bytes=10_000)
    assert [k for k, _, _ in items] == ["b", "c"] and not more


def test_scan_empty() -> None:
    assert KV().scan(None, 10) == ([], False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.binary(max_size=4), max_size=30),
       st.integers(1, 7))
def test_scan_pages_cover_every_key_once_in_order(data: dict[str, bytes], limit: int) -> None:
    kv = KV(dict(data), applied=1)
    seen: list[tuple[str, bytes | str]] = []
    after: str | None = None
    for _ in range(len(data) + 2):
        page, more = kv.scan(after, limit)
        assert len(page) <= limit
        seen.extend((k, v) for k, v, _ in page)
        if not more:
            break
        assert len(page) == limit
        after = page[-1][0]
    else:
        pytest.fail("scan never finished")
    assert seen == sorted(data.items())


ops = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.none() | st.text(max_size=3)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.data())
def test_log_and_kv_agree_with_a_dict_model(script: list[tuple[str, str | None]],
                                            data: st.DataObject) -> None:
    lg, kv = Log(), KV()
    for i, (key, value) in enumerate(script, start=1):
        e = put(i, key, value) if value is not None else delete(i, key)
        lg.append(e)
        kv.apply(e)
    model, where = _model(script)
    assert kv.data == model and kv.indexes == where
    assert {k: kv.get(k) for k in "abcd"} == {k: (model[k], where[k]) if k in model else None
                                              for k in "abcd"}
    # truncating and replaying gives the map of the prefix
    cut = data.draw(st.integers(0, len(script)))
    lg.truncate_after(cut)
    replay = KV()
    for e in lg.slice(1, len(script)):
        replay.apply(e)
    prefix, prefix_where = _model(script[:cut])
    assert replay.data == prefix and replay.applied == cut and replay.indexes == prefix_where


def _model(script: list[tuple[str, str | None]]) -> tuple[dict[str, str], dict[str, int]]:
    """Each key's value and the (1-based) position of the write that set it."""
    model: dict[str, str] = {}
    where: dict[str, int] = {}
    for i, (key, value) in enumerate(script, start=1):
        if value is None:
            model.pop(key, None)
            where.pop(key, None)
        else:
            model[key] = value
            where[key] = i
    return model, where
