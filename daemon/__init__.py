"""The seqshare service process: configuration, CLI, systemd integration, logs, memory setup, reload."""
