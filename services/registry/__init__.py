"""The registry service: robots, the hosts they run on, and their presence."""
