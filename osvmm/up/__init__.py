"""Many partitions in one VMM process: the supervisor, consoles, the control socket."""
