"""The drive data model (src/drive.py) over MemoryKV: round trips, names,
trees, quota, races and crash recovery of every multi-step operation."""

import json
import os
import random
import threading
import time

import pytest

import src.drive
from src.drive import (JOURNAL_SHARDS, Busy, Damaged, Drive, DriveError, InvalidName, ItemNotFound, MoveRefused,
                       NameTaken, QuotaExceeded, check_name, numbered)
from src.kv import MemoryKV

CB = 64  # a small chunk size, so "many chunks" is cheap


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def kv():
    return MemoryKV()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def drive(kv, clock):
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, lease_s=60, clock=clock)
    yield d
    d.close()


def read_all(d, user, e, start=0, end=None):
    return b"".join(bytes(p) for p in d.read(user, e, start, end))


def chunk_rows(kv, user):
    return sorted(r for r in kv._rows if r.startswith(f"drive/c/{user}/".encode()))


def journal(kv):
    return [c for k in range(JOURNAL_SHARDS) for c in kv.cols(f"drive/j/{k}")]


@pytest.mark.parametrize("size", [0, 1, CB - 1, CB, CB + 1, 7 * CB + 13, 20 * CB])
@pytest.mark.parametrize("window", [1, 4])
def test_round_trip_sizes(kv, clock, size, window):
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, window=window, clock=clock)
    root = d.root("alice")
    data = os.urandom(size)
    # Feed it in uneven pieces, as a socket would.
    pieces, i, rng = [], 0, random.Random(size)
    while i < size:
        n = rng.randint(1, 3 * CB)
        pieces.append(data[i:i + n])
        i += n
    e = d.upload("alice", root, "blob.bin", pieces)
    assert e.size == size and e.name == "blob.bin"
    assert read_all(d, "alice", e) == data
    assert [x.name for x in d.listing("alice", root)] == ["blob.bin"]
    assert len(chunk_rows(kv, "alice")) == -(-size // CB)
    assert d.usage("alice").used == size
    assert journal(kv) == []
    d.close()


def test_ranges_at_edges(drive):
    root = drive.root("alice")
    data = os.urandom(5 * CB + 7)
    e = drive.upload("alice", root, "r.bin", data)
    n = len(data)
    for start, end in [(0, 0), (0, CB - 1), (CB - 1, CB), (CB, CB), (CB, 2 * CB - 1), (n - 1, n - 1),
                       (3, n - 1), (2 * CB + 5, 4 * CB + 1), (0, n - 1)]:
        assert read_all(drive, "alice", e, start, end) == data[start:end + 1], (start, end)


def test_names_refused_with_clear_messages(drive):
    root = drive.root("alice")
    cases = {"": "empty", "   ": "empty", ".": "cannot be used", "..": "cannot be used",
             "a/b": '"/"', "a\x00b": "NUL", "a\nb": "control", "x" * 256: "255 bytes",
             "é" * 128: "255 bytes"}
    for bad, why in cases.items():
        with pytest.raises(InvalidName, match=why):
            drive.mkdir("alice", root, bad)
        with pytest.raises(InvalidName):
            drive.upload("alice", root, bad, b"x")
    assert drive.listing("alice", root) == []
    assert chunk_rows(drive.kv, "alice") == []


def test_names_with_spaces_and_unicode(drive):
    root = drive.root("alice")
    names = ["my file.txt", " leading and trailing ", "Ünïcödé ファイル 文件.pdf", "emoji 🎉.png",
             "x" * 255, "é" * 127, "100% 'quotes' \"and\" ;semicolons;", ".hidden", "..."]
    for name in names:
        drive.upload("alice", root, name, name.encode())
    listed = {e.name: e for e in drive.listing("alice", root)}
    assert set(listed) == set(names)
    for name in names:
        assert read_all(drive, "alice", drive.entry("alice", root, name)) == name.encode()
    # Unicode NFC: a decomposed "é" finds the composed one.
    drive.upload("alice", root, "caf\u00e9", b"1")
    assert drive.entry("alice", root, "cafe\u0301").name == "caf\u00e9"


def test_invisible_format_characters_are_refused(drive, monkeypatch):
    """A right-to-left override shows "report \u202etxt.exe" as "report exe.txt":
    bidi controls, zero-width spaces and other invisible format characters
    (and C1 controls, line separators) are refused in every new name."""
    root = drive.root("alice")
    drive.upload("alice", root, "ok.txt", b"x")
    bad = ["report \u202etxt.exe", "a\u202ab", "a\u202bb", "a\u202cb", "a\u202db", "\u2066x\u2069.exe",
           "a\u2067b", "a\u2068b", "a\u200eb", "a\u200fb", "a\u061cb", "zero\u200bwidth", "\ufeffbom",
           "soft\u00adhyphen", "word\u2060joiner"]
    for name in bad:
        for act in (lambda: drive.mkdir("alice", root, name),
                    lambda: drive.upload("alice", root, name, b"x"),
                    lambda: drive.rename("alice", root, "ok.txt", name)):
            with pytest.raises(InvalidName, match="invisible formatting character"):
                act()
    with pytest.raises(InvalidName, match=r"U\+202E \(right-to-left override\).*extension"):
        drive.rename("alice", root, "ok.txt", "ok \u202etxt.exe")
    for name in ["x\u0085y", "a\u2028b", "a\u2029b", "a\x9bb"]:
        with pytest.raises(InvalidName, match="control characters"):
            drive.mkdir("alice", root, name)
    # Emoji and scripts that need joiners still work.
    for name in ["\U0001f469\u200d\U0001f4bb.png", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt",
                 "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f trip.jpg"]:
        drive.upload("alice", root, name, b"y")
    assert len(drive.listing("alice", root)) == 4
    # A name stored before the rule (an older version) can still be opened,
    # moved, renamed to a clean name and deleted.
    monkeypatch.setattr(src.drive, "check_name", src.drive._name_key)
    old = drive.upload("alice", root, "old \u202etxt.exe", b"old")
    sub = drive.mkdir("alice", root, "sub\u200b")
    monkeypatch.undo()
    assert read_all(drive, "alice", drive.entry("alice", root, old.name)) == b"old"
    drive.move("alice", root, old.name, sub.id)
    drive.rename("alice", sub.id, old.name, "old.exe")
    drive.delete("alice", sub.id, "old.exe")
    drive.rename("alice", root, sub.name, "sub")


@pytest.mark.parametrize("n, shown", [(0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"), (1024, "1 KiB"),
                                      (1536, "1.5 KiB"), (25 * 2**20, "25 MiB"), (int(28.6 * 2**20), "28.6 MiB"),
                                      (3 * 2**30, "3 GiB"), (5 * 2**40, "5 TiB"),
                                      (2**20 - 1, "1 MiB"), (2**30 - 1, "1 GiB")])   # (UX QA: "1024 KiB")
def test_one_size_format_for_the_drive_and_the_mail_pages(n, shown):
    """QA5 D-human-size: the drive said "1.0 KiB" and "1 byte", the mail page
    "1 KiB" and "1 bytes" (and "5120 GiB"), so one drive file's size read
    differently in the compose page's picker. One function now, the mail's
    form without ".0", with the singular and TiB."""
    from httpserver.apps import mail
    assert src.drive.human_size(n) == shown
    assert mail.human_size is src.drive.human_size


def test_numbered():
    assert numbered("report.pdf", 2) == "report (2).pdf"
    assert numbered("Photos", 3) == "Photos (3)"
    assert numbered(".bashrc", 2) == ".bashrc (2)"
    long = "y" * 250 + ".txt"
    assert len(numbered(long, 12).encode()) <= 255 and numbered(long, 12).endswith(" (12).txt")
    assert check_name(numbered("z" * 255, 999)) is not None


def test_upload_same_name_keeps_both(drive):
    root = drive.root("alice")
    a = drive.upload("alice", root, "a.txt", b"first")
    b = drive.upload("alice", root, "a.txt", b"second")
    c = drive.upload("alice", root, "a.txt", b"third")
    assert (a.name, b.name, c.name) == ("a.txt", "a (2).txt", "a (3).txt")
    assert read_all(drive, "alice", drive.entry("alice", root, "a.txt")) == b"first"
    assert read_all(drive, "alice", drive.entry("alice", root, "a (3).txt")) == b"third"
    with pytest.raises(NameTaken):
        drive.mkdir("alice", root, "a.txt")


def test_concurrent_uploads_of_one_name_lose_nothing(kv, clock):
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10**6, clock=clock)
    root = d.root("alice")
    payloads = [os.urandom(3 * CB + i) for i in range(8)]
    errors = []

    def up(p):
        try:
            d.upload("alice", root, "same.bin", p)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=up, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    entries = d.listing("alice", root)
    assert len(entries) == 8 and len({e.name for e in entries}) == 8
    assert sorted(read_all(d, "alice", e) for e in entries) == sorted(payloads)
    assert d.usage("alice").used == sum(map(len, payloads))
    d.close()


def test_concurrent_mkdir_and_rename_races(drive):
    root = drive.root("alice")
    results, lock = [], threading.Lock()

    def mk():
        try:
            drive.mkdir("alice", root, "Shared")
            r = "ok"
        except NameTaken:
            r = "taken"
        with lock:
            results.append(r)

    threads = [threading.Thread(target=mk) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["ok"] + ["taken"] * 5
    # Two renames of different files to one name: exactly one wins.
    drive.upload("alice", root, "a", b"A")
    drive.upload("alice", root, "b", b"B")
    outcome = []

    def ren(src):
        try:
            drive.rename("alice", root, src, "target")
            outcome.append(src)
        except NameTaken:
            outcome.append("taken")

    ts = [threading.Thread(target=ren, args=(s,)) for s in ("a", "b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert sorted(outcome)[1] == "taken"
    names = sorted(e.name for e in drive.listing("alice", root))
    assert names == sorted(["Shared", "target", "b" if outcome.count("a") else "a"])
    winner = outcome[0] if outcome[0] != "taken" else outcome[1]
    assert read_all(drive, "alice", drive.entry("alice", root, "target")) == winner.upper().encode()


def build_tree(d, user, root, depth=6):
    """root/d0/d1/.../d5, each with a file; returns the folder ids."""
    ids = []
    parent = root
    for i in range(depth):
        f = d.mkdir(user, parent, f"d{i}")
        d.upload(user, f.id, f"file{i}.bin", os.urandom(CB * 2 + i))
        ids.append(f.id)
        parent = f.id
    return ids


def test_deep_tree_rename_move_delete(drive, kv, clock):
    root = drive.root("alice")
    ids = build_tree(drive, "alice", root)
    deepest = ids[-1]
    assert [n for _, n in drive.breadcrumbs("alice", deepest)] == ["", "d0", "d1", "d2", "d3", "d4", "d5"]
    # Renaming the top folder touches only its entry and meta: the subtree is unchanged.
    before = {r: dict(c) for r, c in kv._rows.items() if r.startswith(f"drive/d/alice/{ids[3]}".encode())}
    drive.rename("alice", root, "d0", "top")
    after = {r: dict(c) for r, c in kv._rows.items() if r.startswith(f"drive/d/alice/{ids[3]}".encode())}
    assert before == after
    assert [n for _, n in drive.breadcrumbs("alice", deepest)][:2] == ["", "top"]
    # Moving a folder into its own subtree (or itself) is refused.
    with pytest.raises(MoveRefused):
        drive.move("alice", root, "top", ids[4])
    with pytest.raises(MoveRefused):
        drive.move("alice", root, "top", ids[0])
    # Move d3 (with d4, d5) up to the root.
    drive.move("alice", ids[2], "d3", root)
    assert [n for _, n in drive.breadcrumbs("alice", deepest)] == ["", "d3", "d4", "d5"]
    assert sorted(e.name for e in drive.listing("alice", root)) == ["d3", "top"]
    assert [e.name for e in drive.listing("alice", ids[2])] == ["file2.bin"]
    used = drive.usage("alice").used
    # Delete the whole "top" tree: its chunks and rows are gone, the quota is refunded.
    drive.delete("alice", root, "top")
    assert [e.name for e in drive.listing("alice", root)] == ["d3"]
    for fid in ids[:3]:
        with pytest.raises(ItemNotFound):
            drive.listing("alice", fid)
        assert not kv.cols(f"drive/d/alice/{fid}")
    assert drive.usage("alice").used == used - sum(CB * 2 + i for i in range(3))
    drive.delete("alice", root, "d3")
    assert drive.listing("alice", root) == []
    assert chunk_rows(kv, "alice") == []
    assert drive.usage("alice").used == 0
    # Only the tombstones of deleted files remain, and they expire.
    assert journal(kv) and all(b"/tb-" in c for c in journal(kv))
    clock.t += 10_000
    drive.sweep()
    assert journal(kv) == []
    assert not [r for r in kv._rows if r.startswith(b"drive/f/")]


def test_move_name_conflict_and_dead_target(drive):
    root = drive.root("alice")
    a = drive.mkdir("alice", root, "A")
    drive.upload("alice", root, "x.txt", b"root x")
    drive.upload("alice", a.id, "x.txt", b"a x")
    with pytest.raises(NameTaken):
        drive.move("alice", root, "x.txt", a.id)
    moved = drive.move("alice", root, "x.txt", a.id, "y.txt")
    assert read_all(drive, "alice", moved) == b"root x"
    drive.delete("alice", root, "A")
    drive.upload("alice", root, "z", b"z")
    with pytest.raises(ItemNotFound):
        drive.move("alice", root, "z", a.id)


def test_users_are_isolated(drive):
    ra = drive.root("alice")
    rb = drive.root("bob")
    assert ra != rb
    f = drive.mkdir("alice", ra, "private")
    e = drive.upload("alice", f.id, "secret.txt", b"alice only")
    # Bob, knowing every id of alice's, finds nothing.
    for call in (lambda: drive.listing("bob", ra), lambda: drive.listing("bob", f.id),
                 lambda: drive.entry("bob", f.id, "secret.txt"),
                 lambda: drive.delete("bob", f.id, "secret.txt"),
                 lambda: drive.delete("bob", ra, "private"),
                 lambda: drive.rename("bob", f.id, "secret.txt", "mine.txt"),
                 lambda: drive.move("bob", f.id, "secret.txt", rb),
                 lambda: drive.mkdir("bob", f.id, "intruder"),
                 lambda: drive.upload("bob", f.id, "planted.txt", b"x"),
                 lambda: drive.breadcrumbs("bob", f.id)):
        with pytest.raises(ItemNotFound):
            call()
    # Reading with alice's entry but as bob: no chunks under bob's rows.
    with pytest.raises(Damaged):
        read_all(drive, "bob", e)
    assert read_all(drive, "alice", drive.entry("alice", f.id, "secret.txt")) == b"alice only"
    assert drive.listing("bob", rb) == []


def test_bad_ids_are_not_found(drive):
    drive.root("alice")
    for bad in ["", "root", "../x", "a" * 5000, "0" * 31, "G" * 32]:
        with pytest.raises(ItemNotFound):
            drive.listing("alice", bad)


def test_quota(kv, clock):
    d = Drive(kv, chunk_bytes=CB, quota_bytes=1000, clock=clock)
    root = d.root("alice")
    d.upload("alice", root, "a", b"x" * 600)
    with pytest.raises(QuotaExceeded, match="Not enough space"):
        d.upload("alice", root, "b", b"y" * 401)
    assert [e.name for e in d.listing("alice", root)] == ["a"]
    assert len(chunk_rows(kv, "alice")) == -(-600 // CB)  # the refused upload left nothing
    d.upload("alice", root, "c", b"z" * 400)
    assert d.usage("alice").used == 1000
    with pytest.raises(QuotaExceeded, match="Nothing was uploaded"):   # (UX QA G10: it did not say so)
        d.check_fits("alice", 10**6)            # (a request body that can never fit)
    d.check_fits("alice", 1000)                 # (one that might: its form framing is not charged)
    d.delete("alice", root, "a")
    assert d.usage("alice").used == 400
    assert d.usage("bob").used == 0
    d.close()


# -- crash recovery: each multi-step operation stopped after every step --------------

class Crash(Exception):
    pass


class CrashingKV(MemoryKV):
    """MemoryKV that raises Crash instead of performing the n-th write."""

    def __init__(self):
        super().__init__()
        self.countdown = None

    def _tick(self):
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown < 0:
                raise Crash()

    def put(self, *a):
        self._tick()
        return super().put(*a)

    def putnx(self, *a):
        self._tick()
        return super().putnx(*a)

    def cput(self, *a):
        self._tick()
        return super().cput(*a)

    def delete(self, *a):
        self._tick()
        return super().delete(*a)

    def delrow(self, *a):
        self._tick()
        return super().delrow(*a)


def visible_files(d, user, root):
    return {e.name: e for e in d.listing(user, root)}


def settle(d, clock):
    """What happens after the crashed frontend's leases run out: a sweep."""
    clock.t += 10_000
    d.sweep()
    clock.t += 10_000  # and the tombstones expire
    d.sweep()
    assert d.sweep() == 0


def test_upload_crash_at_every_write(clock):
    data = os.urandom(5 * CB + 3)
    step = 0
    while True:
        kv = CrashingKV()
        d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, window=1, clock=clock)
        root = d.root("alice")
        kv.countdown = step
        try:
            d.upload("alice", root, "f.bin", data)
            finished = True
        except Crash:
            finished = False
        kv.countdown = None
        # Right after the crash: either the whole file or nothing.
        files = visible_files(d, "alice", root)
        if "f.bin" in files:
            assert read_all(d, "alice", files["f.bin"]) == data
        settle(d, clock)
        files = visible_files(d, "alice", root)
        assert journal(kv) == []
        if "f.bin" in files:
            assert read_all(d, "alice", files["f.bin"]) == data
            assert d.usage("alice").used == len(data)
            assert len(chunk_rows(kv, "alice")) == 6
        else:
            assert chunk_rows(kv, "alice") == [], step  # orphaned chunks reclaimed
            assert d.usage("alice").used == 0
            assert not [r for r in kv._rows if r.startswith(b"drive/f/")]
        d.close()
        if finished:
            break
        step += 1
    assert step > 8


def test_delete_crash_at_every_write(clock):
    step = 0
    while True:
        kv = CrashingKV()
        d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, window=1, clock=clock)
        root = d.root("alice")
        top = d.mkdir("alice", root, "top")
        sub = d.mkdir("alice", top.id, "sub")
        d.upload("alice", sub.id, "deep.bin", os.urandom(3 * CB))
        d.upload("alice", top.id, "mid.bin", os.urandom(2 * CB))
        keep = d.upload("alice", root, "keep.bin", b"keep me")
        kv.countdown = step
        try:
            d.delete("alice", root, "top")
            finished = True
        except Crash:
            finished = False
        kv.countdown = None
        settle(d, clock)
        names = set(visible_files(d, "alice", root))
        assert "keep.bin" in names
        assert journal(kv) == []
        if "top" not in names:
            # Deleted (finished by the sweeper if need be): nothing of it is left.
            assert [r for r in chunk_rows(kv, "alice") if keep.id not in r.decode()] == []
            assert d.usage("alice").used == len(b"keep me")
        else:
            # Not started: everything is intact, and deleting again works.
            d.delete("alice", root, "top")
            assert d.usage("alice").used == len(b"keep me")
        assert len(chunk_rows(kv, "alice")) == 1
        d.close()
        if finished:
            break
        step += 1
    assert step > 10


def test_move_crash_at_every_write(clock):
    step = 0
    while True:
        kv = CrashingKV()
        d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, window=1, clock=clock)
        root = d.root("alice")
        a = d.mkdir("alice", root, "A")
        b = d.mkdir("alice", root, "B")
        d.upload("alice", a.id, "f", b"data")
        inner = d.mkdir("alice", a.id, "inner")
        kv.countdown = step
        try:
            d.move("alice", a.id, "inner", b.id, "renamed")
            d.move("alice", a.id, "f", b.id)
            finished = True
        except Crash:
            finished = False
        kv.countdown = None
        settle(d, clock)
        in_a = {e.name for e in d.listing("alice", a.id)}
        in_b = {e.name for e in d.listing("alice", b.id)}
        # Each item is in exactly one place, and a moved folder knows its new parent.
        assert len(in_a & {"f"}) + len(in_b & {"f"}) == 1
        assert len(in_a & {"inner"}) + len(in_b & {"renamed"}) == 1
        trail = [n for _, n in d.breadcrumbs("alice", inner.id)]
        assert trail == (["", "B", "renamed"] if "renamed" in in_b else ["", "A", "inner"])
        assert journal(kv) == []
        d.close()
        if finished:
            break
        step += 1


def test_slow_upload_given_up_by_sweeper_fails_cleanly(drive, clock, kv):
    root = drive.root("alice")
    up = drive.start_upload("alice", root, "slow.bin")
    up.write(os.urandom(3 * CB))
    clock.t += 10_000
    assert drive.sweep() == 1
    with pytest.raises(DriveError, match="too long"):
        up.commit()
    assert visible_files(drive, "alice", root) == {}
    assert drive.sweep() == 0
    clock.t += 10_000
    assert drive.sweep() == 1  # the tombstone
    assert chunk_rows(kv, "alice") == []
    assert drive.usage("alice").used == 0


def test_sweep_leaves_live_operations_alone(drive, clock, kv):
    root = drive.root("alice")
    up = drive.start_upload("alice", root, "busy.bin")
    up.write(os.urandom(2 * CB))
    assert drive.sweep() == 0  # lease not expired
    e = up.commit()
    assert read_all(drive, "alice", e) is not None
    assert journal(kv) == []


def test_crossed_folder_moves_never_make_a_cycle(drive):
    root = drive.root("alice")
    for attempt in range(20):
        a = drive.mkdir("alice", root, f"A{attempt}")
        b = drive.mkdir("alice", root, f"B{attempt}")
        barrier = threading.Barrier(2)
        out = []

        def mv(name, dest):
            barrier.wait(5)
            try:
                drive.move("alice", root, name, dest)
                out.append("ok")
            except MoveRefused:
                out.append("refused")

        ts = [threading.Thread(target=mv, args=(f"A{attempt}", b.id)),
              threading.Thread(target=mv, args=(f"B{attempt}", a.id))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert sorted(out) == ["ok", "refused"]
        # Both folders are still reachable from the root.
        for fid in (a.id, b.id):
            assert drive.breadcrumbs("alice", fid)[0][0] == root


def test_move_and_delete_of_one_item_at_once(drive, kv):
    """Whatever the interleaving, the file ends up either deleted or moved, never both."""
    root = drive.root("alice")
    dest = drive.mkdir("alice", root, "dest")
    for attempt in range(20):
        name = f"f{attempt}"
        drive.upload("alice", root, name, b"payload")
        barrier = threading.Barrier(2)
        out = {}

        def rm():
            barrier.wait(5)
            try:
                drive.delete("alice", root, name)
                out["rm"] = True
            except ItemNotFound:
                out["rm"] = False

        def mv():
            barrier.wait(5)
            try:
                drive.move("alice", root, name, dest.id)
                out["mv"] = True
            except ItemNotFound:
                out["mv"] = False

        ts = [threading.Thread(target=rm), threading.Thread(target=mv)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        in_root = name in {e.name for e in drive.listing("alice", root)}
        in_dest = name in {e.name for e in drive.listing("alice", dest.id)}
        assert out["mv"] != out["rm"]  # exactly one of them happened
        if out["mv"]:
            assert in_dest and not in_root
            assert read_all(drive, "alice", drive.entry("alice", dest.id, name)) == b"payload"
        else:
            assert not in_dest and not in_root


def test_slow_upload_keeps_its_lease(drive, clock, kv):
    """Bytes trickling in slower than a chunk per lease still renew the lease."""
    root = drive.root("alice")
    up = drive.start_upload("alice", root, "trickle.bin")
    for _ in range(10):
        clock.t += drive.lease_s / 2  # each write comes half a lease after the last
        up.write(b"x")                # (far less than a chunk)
        assert drive.sweep() == 0
    assert read_all(drive, "alice", up.commit()) == b"x" * 10


def test_a_failed_operation_leaves_no_claim_that_a_later_one_could_share(drive, kv):
    """An entry still marked by an operation that failed half-way can be claimed by one
    new operation only."""
    root = drive.root("alice")
    drive.upload("alice", root, "f", b"data")
    dest = drive.mkdir("alice", root, "dest")
    raw, e = drive._entry_raw("alice", root, "f")
    drive._claim("alice", root, raw, e, "rm-" + "0" * 32)  # a delete that died right after claiming
    raw, e = drive._entry_raw("alice", root, "f")
    drive._claim("alice", root, raw, e, "rm-" + "1" * 32)  # a new delete claims it...
    with pytest.raises(ItemNotFound, match="just been changed"):
        drive._claim("alice", root, raw, e, "mv-" + "2" * 32)  # ...so a move that read the same value cannot
    assert [x.name for x in drive.listing("alice", dest.id)] == []


def test_a_claim_is_exclusive_while_its_operation_lives(clock):
    """An entry claimed by an operation whose intent exists (running, or
    crashed and not yet swept) cannot be claimed by another one; once the
    sweeper has dealt with the dead one, its mark means nothing."""
    kv = CrashingKV()
    d = Drive(kv, chunk_bytes=CB, clock=clock, window=1)
    root = d.root("alice")
    dest = d.mkdir("alice", root, "dest")
    d.upload("alice", root, "f", b"data")
    kv.countdown = 2  # the intent and the claim go through, the next write "crashes"
    with pytest.raises(Crash):
        d.delete("alice", root, "f")
    kv.countdown = None
    first = json.loads(kv.get(f"drive/d/alice/{root}", b"e/f"))["op"]
    with pytest.raises(Busy):
        d.delete("alice", root, "f")
    with pytest.raises(Busy):
        d.move("alice", root, "f", dest.id)
    assert json.loads(kv.get(f"drive/d/alice/{root}", b"e/f"))["op"] == first
    clock.t += 10_000
    assert d.sweep() == 1             # the crashed delete never reached its point of no return
    assert read_all(d, "alice", d.entry("alice", root, "f")) == b"data"
    d.delete("alice", root, "f")
    assert "f" not in visible_files(d, "alice", root) and d.usage("alice").used == 0
    d.close()


# -- races pinned down: one operation stopped at a chosen write while another runs --------

class GateKV(MemoryKV):
    """MemoryKV that stops the thread making a chosen write, just after it
    (`stop_after(pred)`: pred(method, row, col) picks the write), until the test
    calls `go()`. `stopped` is set once a thread is waiting there."""

    def __init__(self):
        super().__init__()
        self.pred = None
        self.stopped = threading.Event()
        self._go = threading.Event()

    def stop_after(self, pred):
        self.pred, self._go = pred, threading.Event()
        self.stopped.clear()

    def go(self):
        self._go.set()

    def _after(self, method, row, col):
        pred = self.pred
        if pred is not None and pred(method, bytes(row).decode(), bytes(col).decode()):
            self.pred = None
            self.stopped.set()
            self._go.wait(10)

    def put(self, row, col, value):
        super().put(row, col, value)
        self._after("put", row, col)

    def putnx(self, row, col, value):
        super().putnx(row, col, value)
        self._after("putnx", row, col)

    def cput(self, row, col, old, new):
        super().cput(row, col, old, new)
        self._after("cput", row, col)


def in_thread(fn, *args):
    out = {}

    def run():
        try:
            out["ok"] = fn(*args)
        except Exception as e:              # noqa: BLE001 - the test looks at it
            out["err"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_an_item_a_move_holds_cannot_be_deleted_moved_or_renamed_meanwhile(clock):
    """QA saw a move and a delete from two tabs both answer 200: the moved
    file was listed with its data gone. The second operation read the entry
    after the first one's claim and claimed it again."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    dest, other = d.mkdir("alice", root, "dest"), d.mkdir("alice", root, "other")
    d.upload("alice", root, "f", b"payload")
    kv.stop_after(lambda m, row, col: m == "cput" and col == "e/f")     # right after the move's claim
    t, out = in_thread(d.move, "alice", root, "f", dest.id)
    assert kv.stopped.wait(5)
    with pytest.raises(Busy):
        d.delete("alice", root, "f")
    with pytest.raises(Busy):
        d.move("alice", root, "f", other.id)
    with pytest.raises(Busy):
        d.rename("alice", root, "f", "g")
    kv.go()
    t.join(5)
    assert "ok" in out
    assert [e.name for e in d.listing("alice", dest.id)] == ["f"]
    assert "f" not in visible_files(d, "alice", root) and d.listing("alice", other.id) == []
    assert read_all(d, "alice", d.entry("alice", dest.id, "f")) == b"payload"
    assert d.usage("alice").used == 7 and journal(kv) == []
    d.close()


def test_a_file_moved_out_of_a_folder_being_deleted_survives(clock):
    """The purge of the folder waits for the move that holds the file: the
    move takes it away and said "Moved", so the file must live on."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    box = d.mkdir("alice", root, "box")
    d.upload("alice", box.id, "keep", b"precious")
    d.upload("alice", box.id, "junk", b"junk")
    kv.stop_after(lambda m, row, col: m == "putnx" and row.endswith(root) and col == "e/keep")
    mover, moved = in_thread(d.move, "alice", box.id, "keep", root)
    assert kv.stopped.wait(5)                # the new entry is written, the old one not yet removed
    deleter, deleted = in_thread(d.delete, "alice", root, "box")
    time.sleep(0.3)                          # the purge is now waiting for the move
    kv.go()
    mover.join(5)
    deleter.join(10)
    assert "ok" in moved and "ok" in deleted
    assert visible_files(d, "alice", root).keys() == {"keep"}
    assert read_all(d, "alice", d.entry("alice", root, "keep")) == b"precious"
    assert d.usage("alice").used == len(b"precious")
    assert [c for c in journal(kv) if b"/tb-" not in c] == []     # only junk's tombstone
    d.close()


def test_a_file_moved_into_a_folder_being_deleted_stays_where_it_was(clock):
    """The move has written its entry into the folder when the folder dies:
    the move sees that and takes the entry back (404), and the purge, which
    waited for the move, does not kill the file meanwhile."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    box = d.mkdir("alice", root, "box")
    d.upload("alice", root, "f", b"precious")
    kv.stop_after(lambda m, row, col: m == "putnx" and row.endswith(box.id) and col == "e/f")
    mover, moved = in_thread(d.move, "alice", root, "f", box.id)
    assert kv.stopped.wait(5)                # the entry is in the folder; its life not yet checked
    deleter, deleted = in_thread(d.delete, "alice", root, "box")
    time.sleep(0.3)
    kv.go()
    mover.join(5)
    deleter.join(10)
    assert isinstance(moved.get("err"), ItemNotFound) and "ok" in deleted
    assert visible_files(d, "alice", root).keys() == {"f"}
    assert read_all(d, "alice", d.entry("alice", root, "f")) == b"precious"
    assert d.usage("alice").used == len(b"precious") and journal(kv) == []
    d.close()


def test_a_half_done_file_move_listed_twice_cannot_be_deleted_in_either_place(clock):
    """A frontend died between writing the new entry and removing the old
    one: the file shows in both folders until the sweeper finishes the move.
    Deleting "the extra copy" used to kill the file in both; now both
    entries belong to the unfinished move until then."""
    kv = CrashingKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    dest = d.mkdir("alice", root, "dest")
    d.upload("alice", root, "f", b"data")
    kv.countdown = 3  # intent, claim, new entry; removing the old entry "crashes"
    with pytest.raises(Crash):
        d.move("alice", root, "f", dest.id)
    kv.countdown = None
    assert "f" in visible_files(d, "alice", root) and "f" in visible_files(d, "alice", dest.id)
    for folder in (root, dest.id):
        with pytest.raises(Busy):
            d.delete("alice", folder, "f")
    clock.t += 10_000
    d.sweep()
    assert "f" not in visible_files(d, "alice", root)
    assert read_all(d, "alice", d.entry("alice", dest.id, "f")) == b"data"
    assert d.usage("alice").used == 4
    d.close()


def test_the_sweeper_never_finishes_a_folder_move_into_a_cycle(clock):
    """A frontend died in the middle of moving folder M into D (M listed in
    both). The user then moved D into M, whose recorded parent was still the
    root, so the cycle check passed. Finishing the dead move would make D and
    M each other's parents, unreachable from the root for good: the sweeper
    undoes it instead."""
    kv = CrashingKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    m = d.mkdir("alice", root, "M")
    dd = d.mkdir("alice", root, "D")
    d.upload("alice", dd.id, "precious", b"bytes")
    kv.countdown = 4  # lock, intent, claim, entry in D; M's new parent "crashes" (and the lock stays)
    with pytest.raises(Crash):
        d.move("alice", root, "M", dd.id)
    kv.countdown = None
    clock.t += 20                            # the lock's lease is over, the move's is not
    d.move("alice", root, "D", m.id)
    clock.t += 10_000
    d.sweep()
    assert [e.name for e in d.listing("alice", root)] == ["M"]
    assert [e.name for e in d.listing("alice", m.id)] == ["D"]
    assert [e.name for e in d.listing("alice", dd.id)] == ["precious"]
    assert [n for _, n in d.breadcrumbs("alice", dd.id)] == ["", "M", "D"]
    assert read_all(d, "alice", d.entry("alice", dd.id, "precious")) == b"bytes"
    d.close()


def test_a_file_deleted_while_it_is_read_is_not_called_damaged(clock):
    kv = MemoryKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, window=1, clock=clock)
    root = d.root("alice")
    e = d.upload("alice", root, "f", os.urandom(5 * CB))
    chunks = d.read("alice", e)
    next(chunks)
    d.delete("alice", root, "f")
    with pytest.raises(ItemNotFound, match="deleted while it was being read"):
        list(chunks)
    d.close()


def test_a_purge_whose_claim_lost_to_a_failing_move_reads_the_child_again(clock):
    """Crash QA round 2: the purge of folder T read T/x.bin, a move from
    another tab claimed it first and then failed (the target already had an
    x.bin), and the purge, told "has just been changed", skipped the child:
    T's row went with the entry still in it, the file live and charged for
    ever. Now the purge reads the child again and deletes it."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    t = d.mkdir("alice", root, "T")
    dest = d.mkdir("alice", root, "dest")
    d.upload("alice", t.id, "x.bin", b"doomed")
    d.upload("alice", dest.id, "x.bin", b"kept")
    kv.stop_after(lambda m, row, col: m == "put" and row.startswith("drive/j/") and "/rm-" in col)
    deleter, deleted = in_thread(d.delete, "alice", root, "T")
    assert kv.stopped.wait(5)                   # the purge has read x.bin, not claimed it yet
    with pytest.raises(NameTaken):
        d.move("alice", t.id, "x.bin", dest.id)  # claims it, then fails: the name is taken there
    kv.go()
    deleter.join(10)
    assert "ok" in deleted
    assert [e.name for e in d.listing("alice", root)] == ["dest"]
    assert read_all(d, "alice", d.entry("alice", dest.id, "x.bin")) == b"kept"
    assert d.usage("alice").used == len(b"kept")
    assert not [r for r in kv._rows if r.startswith(f"drive/d/alice/{t.id}".encode())]
    d.close()


def test_a_file_whose_upload_is_settling_cannot_be_deleted_meanwhile(clock):
    """Review: a delete between an upload's visible entry and its quota
    settling took the upload's hold for its own, and the bytes stayed
    charged for ever. The entry is the upload's until it has settled."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    kv.stop_after(lambda m, row, col: m == "putnx" and row.endswith(root) and col == "e/f")
    uploader, uploaded = in_thread(d.upload, "alice", root, "f", b"x" * 100)
    assert kv.stopped.wait(5)                  # visible, not settled yet
    with pytest.raises(Busy):
        d.delete("alice", root, "f")
    kv.go()
    uploader.join(5)
    assert "ok" in uploaded and d.usage("alice").used == 100
    d.delete("alice", root, "f")
    assert d.listing("alice", root) == [] and d.usage("alice").used == 0
    d.close()


def test_undoing_a_hung_folder_move_gives_the_folder_its_old_parent_back(clock, monkeypatch):
    """Review: a folder move that died after giving the folder its new parent
    (but before removing its old entry), into a folder the user then
    deleted: the sweeper's undo removed the new entry but left the parent
    pointing at the deleted folder, so the folder could not be opened."""
    monkeypatch.setattr(src.drive, "CLAIM_WAIT_S", 0.1)
    kv = CrashingKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    m = d.mkdir("alice", root, "M")
    dd = d.mkdir("alice", root, "D")
    d.upload("alice", m.id, "inside", b"bytes")
    kv.countdown = 5  # lock, intent, claim, entry in D, M's new parent; removing the old entry "crashes"
    with pytest.raises(Crash):
        d.move("alice", root, "M", dd.id)
    kv.countdown = None
    clock.t += 20                              # the lock's lease is over, the move's is not
    d.delete("alice", root, "D")               # its purge waits for the hung move, then leaves it to the sweeper
    clock.t += 10_000
    d.sweep()
    d.sweep()
    assert [e.name for e in d.listing("alice", root)] == ["M"]
    assert [n for _, n in d.breadcrumbs("alice", m.id)] == ["", "M"]
    assert read_all(d, "alice", d.entry("alice", m.id, "inside")) == b"bytes"
    d.close()


def test_an_upload_into_a_folder_being_deleted_leaves_nothing_behind(clock):
    """Verification QA: the purge decided the state of a file whose upload
    had just made it visible ("live"), so the upload's clean-up, when it saw
    its folder dead, left the file live, unlisted, charged and its chunks
    stored (4 of 95 rounds). The purge now waits for the upload first."""
    kv = GateKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    t = d.mkdir("alice", root, "T")
    kv.stop_after(lambda m, row, col: m == "putnx" and row.endswith(t.id) and col == "e/late.bin")
    uploader, uploaded = in_thread(d.upload, "alice", t.id, "late.bin", b"z" * (3 * CB))
    assert kv.stopped.wait(5)                  # visible in T, not settled
    deleter, deleted = in_thread(d.delete, "alice", root, "T")
    time.sleep(0.3)                            # the purge waits for the upload
    kv.go()
    uploader.join(5)
    deleter.join(10)
    assert isinstance(uploaded.get("err"), ItemNotFound) and "ok" in deleted
    assert d.listing("alice", root) == [] and d.usage("alice").used == 0
    assert chunk_rows(kv, "alice") == []
    assert d._read_used("alice")[1]["held"] == {}
    d.close()


def test_the_folder_picker_lists_each_folder_once_while_a_hung_move_shows_it_twice(clock):
    """Crash QA round 2: while a crashed folder move waited for the sweeper,
    the folder was listed in both places, and after the user's next move
    the tree looped: the picker on the move page had 1,907 options."""
    kv = CrashingKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    m = d.mkdir("alice", root, "M")
    dd = d.mkdir("alice", root, "D")
    kv.countdown = 4                          # M's entry is in D and still in My Drive
    with pytest.raises(Crash):
        d.move("alice", root, "M", dd.id)
    kv.countdown = None
    clock.t += 20
    d.move("alice", root, "D", m.id)          # a loop until the sweeper undoes the hung move
    ids = [fid for fid, _, _ in d.folders("alice")]
    assert sorted(ids) == sorted({root, m.id, dd.id}) and len(ids) == 3
    d.close()


def test_a_file_whose_uploader_died_once_visible_is_busy_until_the_sweep(clock, monkeypatch):
    """QA5 D-upload-claim-doc: the entry carries the upload's claim, so a
    rename, move or delete of a file whose uploader died after the entry
    became visible is refused (409), never half settled, until the sweeper
    has decided the file live (docs/drive.md, Known limits)."""
    kv = MemoryKV()
    d = Drive(kv, chunk_bytes=CB, quota_bytes=10_000, clock=clock)
    root = d.root("alice")
    other = d.mkdir("alice", root, "other")

    def dies(*a):
        raise Crash()
    monkeypatch.setattr(d, "_decide", dies)          # the owner dies right after the entry's PUTNX
    with pytest.raises(Crash):
        d.upload("alice", root, "a.txt", b"x" * 100)
    monkeypatch.undo()
    assert "a.txt" in visible_files(d, "alice", root)
    for attempt in (lambda: d.rename("alice", root, "a.txt", "b.txt"),
                    lambda: d.move("alice", root, "a.txt", other.id),
                    lambda: d.delete("alice", root, "a.txt")):
        with pytest.raises(Busy) as refused:
            attempt()
        assert refused.value.status == 409
    clock.t += d.lease_s + 1
    assert d.sweep() >= 1                             # settled: the entry was visible, so "live"
    d.rename("alice", root, "a.txt", "b.txt")
    e = visible_files(d, "alice", root)["b.txt"]
    assert read_all(d, "alice", e) == b"x" * 100 and d.usage("alice").used == 100
    d.close()


def test_dropping_an_abandoned_uploads_chunks_crosses_a_gap_of_window_missing_ones(drive, kv):
    """QA5 D-counts: the walk stops after more than WINDOW misses in a row
    (docs/drive.md says so now; it said "4 in a row"): an upload with WINDOW
    writes in flight can leave a gap of up to WINDOW - 1, never WINDOW + 1."""
    w = drive.window
    for n in [0, 1] + [2 + w] + [2 + w + 1 + w]:      # gaps of exactly WINDOW after chunk 1 and chunk 2+w
        kv.put(f"drive/c/alice/f1/{n}", "d", b"x")
    far = 2 + w + 1 + w + (w + 1) + 1                 # after a gap of WINDOW + 1: not reached
    kv.put(f"drive/c/alice/f1/{far}", "d", b"x")
    drive._drop_chunks("alice", "f1", None)
    assert chunk_rows(kv, "alice") == [f"drive/c/alice/f1/{far}".encode()]


def test_a_folder_move_that_stood_still_past_the_tree_lock_takes_itself_back(clock):
    """Gray-failure QA: the tree lock is a lease. A frontend that stopped
    (a paused VM) for longer than TREE_LOCK_S between its cycle check and
    its writes, while the user moved the target into the folder from
    another tab, made X and Y each other's parents: both vanished from My
    Drive with everything in them. The move that writes its parent second
    sees the cycle and takes its move back."""
    from src.drive import TREE_LOCK_S
    d = Drive(MemoryKV(), chunk_bytes=CB, clock=clock)
    root = d.root("alice")
    x, y = d.mkdir("alice", root, "X"), d.mkdir("alice", root, "Y")
    d.upload("alice", x.id, "inX.bin", b"x" * 500)
    real_move = d._move

    def stands_still(user, folder, raw, e, dest, new_name):
        if e.name == "X":
            clock.t += TREE_LOCK_S + 1                 # its lease runs out meanwhile...
            d.move("alice", root, "Y", x.id)           # ...and another tab moves Y into X
        return real_move(user, folder, raw, e, dest, new_name)
    d._move = stands_still
    with pytest.raises(MoveRefused):
        d.move("alice", root, "X", y.id)
    d._move = real_move
    assert [e.name for e in d.listing("alice", root)] == ["X"]
    assert [e.name for e in d.listing("alice", x.id)] == ["Y", "inX.bin"]
    assert [name for _, name in d.breadcrumbs("alice", y.id)] == ["", "X", "Y"]
    assert d.usage("alice").used == 500
    d.move("alice", root, "X", root, "X renamed")      # nothing is left held
    assert d.sweep(now=clock() + 3600) == 0


def test_a_file_move_that_stood_still_past_its_lease_leaves_no_ghost(clock):
    """Gray-failure QA: a frontend stopped inside a file move for longer
    than the intent's lease; the sweeper settled the move as not done and
    the user deleted the file; the move then resumed and wrote the file's
    entry into the target: a deleted file listed again, every download
    failing, the quota saying 0 bytes used."""
    d = Drive(MemoryKV(), chunk_bytes=CB, clock=clock)
    root = d.root("alice")
    target = d.mkdir("alice", root, "D")
    d.upload("alice", root, "f.bin", b"f" * 300)
    real_put = d._put_entry

    def stands_still(user, folder, entry, op=None):
        if op is not None and op.startswith("mv-"):
            clock.t += d.lease_s + 1                      # its intent's lease runs out...
            assert d.sweep() == 1                         # ...the sweeper settles it: not moved
            d.delete("alice", root, "f.bin")              # ...and the user deletes the file
        return real_put(user, folder, entry, op=op)
    d._put_entry = stands_still
    with pytest.raises(Busy):
        d.move("alice", root, "f.bin", target.id)
    assert d.listing("alice", target.id) == [] and [e.name for e in d.listing("alice", root)] == ["D"]
    assert d.usage("alice").used == 0


def test_one_wording_for_not_enough_space():
    """UX QA: three wordings, "these files" for one file, and "larger than
    the 8.5 MiB you have free" for a file that also read 8.5 MiB."""
    from src.drive import no_space
    assert no_space(9 * 2**20, int(8.5 * 2**20), 40 * 2**20) == \
        "Not enough space: 9 MiB needed, 8.5 MiB free of your 40 MiB."
    assert no_space(8_899_041, 8_898_041, 40 * 2**20, at_least=True) == \
        "Not enough space: at least 8,899,041 bytes needed, 8,898,041 bytes free of your 40 MiB."
    assert no_space(100, -5, 1000, about=True) == "Not enough space: about 100 bytes needed, 0 bytes free of your 1000 bytes."
