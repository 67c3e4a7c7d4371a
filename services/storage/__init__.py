"""The storage service: named buckets of files robots and people share, in the JetStream object store."""
