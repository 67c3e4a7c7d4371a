"""The packages service: processes and their immutable, hashed versions."""
