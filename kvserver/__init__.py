"""The tablet server: stores tablets on disk and serves the KV protocol.

Read in this order (docs/storage.md has the file formats and recovery):

    wal.py          TabletLog: one tablet's write-ahead log; CommitGroup: one sync for all
    checkpoint.py   immutable sorted checkpoint files, the block cache
    tablet.py       Tablet: memtables + checkpoint + log, recovery, checkpoints
    store.py        Store: every tablet of a server, memory budget, checkpointer
    loop.py         EventLoop: every connection on one thread, a turn's writes, one sync
    server.py       KVServer: the protocol (PROTOCOL.md) in front of a Store
    replication.py  the pure primary-backup state machine (cluster mode)
    cluster.py      cluster mode: heartbeats, replication streams, catch-up
    __main__.py     `python -m kvserver --standalone ...` / `--config ... --id ...`
"""
