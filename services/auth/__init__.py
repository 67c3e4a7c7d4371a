"""The auth service: API tokens and who a caller is."""
