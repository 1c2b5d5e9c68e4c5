"""Imported by the verifier workers' fork server: math-verify loaded and warmed up once.

Every worker is forked from that server and inherits the warm interpreter, so a worker that
replaces a killed one is ready in milliseconds.
"""

from services.reward.worker import warm_up

warm_up()
