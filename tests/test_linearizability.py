"""The WGL linearizability checker itself (tests/linearizability.py)."""

import random

from tests.linearizability import INF, UNKNOWN, Op, check, check_register

K = ("row", "col")


def op(kind, args, out, call, ret):
    return Op(K, kind, args, out, call, ret)


def test_sequential_history_is_linearizable():
    h = [op("put", (b"1",), "ok", 0, 1), op("get", (), b"1", 2, 3),
         op("cput", (b"1", b"2"), "ok", 4, 5), op("cput", (b"1", b"3"), "mismatch", 6, 7),
         op("get", (), b"2", 8, 9), op("delete", (), "ok", 10, 11), op("get", (), None, 12, 13),
         op("cput", (b"2", b"4"), "notfound", 14, 15), op("putnx", (b"5",), "ok", 16, 17),
         op("putnx", (b"6",), "exists", 18, 19)]
    assert check_register(h)


def test_concurrent_writes_may_be_ordered_either_way():
    h = [op("put", (b"a",), "ok", 0, 10), op("put", (b"b",), "ok", 1, 9),
         op("get", (), b"a", 11, 12), op("get", (), b"a", 13, 14)]
    assert check_register(h)
    h2 = [op("put", (b"a",), "ok", 0, 10), op("put", (b"b",), "ok", 1, 9),
          op("get", (), b"b", 2, 3), op("get", (), b"a", 4, 5), op("get", (), b"b", 6, 7)]
    assert not check_register(h2)       # b, then a, then b again: no single order


def test_stale_read_after_acknowledged_write_is_caught():
    h = [op("put", (b"1",), "ok", 0, 1), op("put", (b"2",), "ok", 2, 3), op("get", (), b"1", 4, 5)]
    assert not check_register(h)


def test_read_of_a_value_never_written_is_caught():
    h = [op("put", (b"1",), "ok", 0, 1), op("get", (), b"zzz", 2, 3)]
    assert not check_register(h)


def test_two_cputs_from_the_same_old_value_cannot_both_win():
    h = [op("put", (b"0",), "ok", 0, 1),
         op("cput", (b"0", b"A"), "ok", 2, 10), op("cput", (b"0", b"B"), "ok", 3, 11)]
    assert not check_register(h)
    h[2] = op("cput", (b"0", b"B"), "mismatch", 3, 11)
    assert check_register(h)


def test_unknown_outcome_may_or_may_not_have_happened():
    # the PUT's connection broke: a later read may see it ...
    h = [op("put", (b"1",), "ok", 0, 1), op("put", (b"2",), UNKNOWN, 2, INF), op("get", (), b"2", 5, 6)]
    assert check_register(h)
    # ... or not
    h[2] = op("get", (), b"1", 5, 6)
    assert check_register(h)
    # but once seen, it cannot vanish again
    h.append(op("get", (), b"2", 7, 8))
    h.append(op("get", (), b"1", 9, 10))
    assert not check_register(h)


def test_lost_acknowledged_write_is_caught_across_many_operations():
    h = [op("put", (b"%d" % i,), "ok", 2 * i, 2 * i + 1) for i in range(40)]
    h.append(op("get", (), b"38", 100, 101))
    assert not check_register(h)
    h[-1] = op("get", (), b"39", 100, 101)
    assert check_register(h)


def test_keys_are_checked_separately():
    ops = [Op("x", "put", (b"1",), "ok", 0, 1), Op("y", "get", (), None, 2, 3),
           Op("x", "get", (), b"1", 4, 5), Op("y", "get", (), b"1", 6, 7)]
    ok, bad = check(ops)
    assert not ok and bad == "y"
    assert check(ops[:3]) == (True, None)


def test_random_histories_from_a_real_register_pass_and_tampered_ones_fail():
    rng = random.Random(7)
    for trial in range(30):
        # simulate 4 clients on one atomic register; each op takes effect at a random
        # instant inside its interval
        state, ops = None, []
        events = []
        for c in range(4):
            for i in range(6):
                call = rng.uniform(0, 100)
                events.append((call, call + rng.uniform(0.1, 10), c, i))
        events.sort()
        effects = sorted((rng.uniform(call, ret), call, ret, c, i) for call, ret, c, i in events)
        for at, call, ret, c, i in effects:
            kind = rng.choice(["put", "get", "cput", "delete"])
            if kind == "put":
                v = b"%d.%d" % (c, i)
                state, out, args = v, "ok", (v,)
            elif kind == "get":
                out, args = state, ()
            elif kind == "cput":
                old = state if state is not None and rng.random() < 0.5 else b"nope"
                args = (old, b"c%d.%d" % (c, i))
                if state is None:
                    out = "notfound"
                elif state == old:
                    out, state = "ok", args[1]
                else:
                    out = "mismatch"
            else:
                out, state, args = ("ok" if state is not None else "notfound"), None, ()
            ops.append(op(kind, args, out, call, ret))
        assert check_register(ops), trial
        gets = [o for o in ops if o.kind == "get"]
        if gets:
            g = rng.choice(gets)
            g.out = b"never-written"
            assert not check_register(ops)
