"""Process packages as the CLI and robots handle them: manifests, reproducible archives, version order.

Pure but for reading folders and writing unpacked archives; free of SQLAlchemy and the bus.
"""
