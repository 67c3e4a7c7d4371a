"""The robot agent (attended and unattended), the package runner and the SDK scripts import.

The agent arrives with the jobs issue; this package reserves `herder.robot` in the namespace.
"""
