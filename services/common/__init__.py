"""The runtime every herder service uses: bus, database, requests, events, lifecycle."""
