"""The queues service: work queues and their items, taken by robots one (or a batch) at a time."""
