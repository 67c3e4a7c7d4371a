"""The session coordinator of a terminal server and its session drivers.

The coordinator arrives with the sessions issue; this package reserves `herder.coordinator`.
"""
