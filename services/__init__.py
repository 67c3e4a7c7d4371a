"""herder's services: one subpackage each, on the shared runtime in `services.common`."""
