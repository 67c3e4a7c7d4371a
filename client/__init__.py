"""What every caller of herder uses: the request client, connecting to the bus, following events and logs.

The CLI, robot agents, coordinators and the gateway import this package; it imports nothing of
`herder.services`.
"""
