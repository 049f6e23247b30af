"""``make run``: the whole stack on one machine, on embedded defaults where nothing is configured.

``python -m stack run`` finds or starts a Redis-protocol server, migrates the job store, starts a worker
and the scheduler as child processes, forwards their output, and stops them all on Ctrl+C or SIGTERM.
"""
