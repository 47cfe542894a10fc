"""The asyncio shell: the only package that awaits sockets, owns tasks and schedules timers."""
