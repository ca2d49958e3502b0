"""The master: tablet placement, heartbeats, failure detection, failover.

    python -m master --config FILE --id master [--data DIR] [--port P]

See master/server.py (the process), master/placement.py (the pure decisions)
and master/state.py (the durable state), and docs/replication.md.
"""
