"""The end-to-end test of `make e2e`: the .deb under a real systemd (see run.py)."""
