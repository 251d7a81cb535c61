"""Storage: the embedded redis-server child and the client the rest of the daemon uses."""
