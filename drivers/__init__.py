"""Drivers: whole runs as a user starts them (`make demo`, `make reproduce`), on top of the launchers.

They sit outside the library so that imports run one way: pipeline <- launchers <- drivers.
"""
