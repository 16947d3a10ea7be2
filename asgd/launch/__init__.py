"""Running a cluster on this machine: child processes, the launcher and its live display."""
