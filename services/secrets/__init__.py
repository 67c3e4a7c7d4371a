"""The secrets service: assets (global variables) and credentials, encrypted at rest and sealed in transit."""
