"""System glue: the hardware probe, systemd's notify protocol, the libc calls Python lacks,
and what every child process shares."""
