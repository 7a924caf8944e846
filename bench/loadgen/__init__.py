"""Multi-process WebSocket load generator for rtc and its baselines.

The parent process (:mod:`.fleet`) drives worker processes (:mod:`.worker`) in
lockstep; each worker holds up to ~15,000 sockets on one uvloop event loop.
Scenarios (:mod:`.scenarios`) turn the workers' replies into figures, and
:mod:`.compare` runs every scenario against rtc and each baseline.
"""
