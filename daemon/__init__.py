"""The seqshare service process: configuration, CLI, systemd integration, memory setup."""
