"""The ckptd daemon: accepts snapshots over a Unix socket and commits them to disk."""
