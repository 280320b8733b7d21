"""The shipped units under a real systemd (PID 1 in a systemd-nspawn container)."""
