"""herder's release version and the wire schema version it speaks."""

VERSION = "0.1.0"

# Bumped when a message changes incompatibly; a service refuses requests newer than it knows.
SCHEMA_VERSION = 1
