"""The jobs service: starting, stopping and following jobs on unattended robots."""
