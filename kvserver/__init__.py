"""The tablet server: stores tablets on disk and serves the KV protocol.

Read in this order (docs/storage.md has the file formats and recovery):

    wal.py          TabletLog: one tablet's write-ahead log, group commit
    checkpoint.py   immutable sorted checkpoint files, the block cache
    tablet.py       Tablet: memtables + checkpoint + log, recovery, checkpoints
    store.py        Store: every tablet of a server, row locks, memory budget
    server.py       KVServer: the protocol (PROTOCOL.md) in front of a Store
    replication.py  the pure primary-backup state machine (cluster mode)
    cluster.py      cluster mode: heartbeats, replication streams, catch-up
    __main__.py     `python -m kvserver --standalone ...` / `--config ... --id ...`
"""
