"""herder's wire: every message model, the codec, subject names and error codes. Pure: no I/O."""

from herder.protocol.version import SCHEMA_VERSION, VERSION

__all__ = ["SCHEMA_VERSION", "VERSION"]
