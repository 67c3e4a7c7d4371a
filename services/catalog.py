"""The services herder can run, by name.

Classes are imported when a service is run, not before: the CLI's other commands start
without loading the services' database code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from herder.services.common.runtime import Service

_CLASSES = {
    "auth": "herder.services.auth.service:AuthService",
    "packages": "herder.services.packages.service:PackagesService",
    "registry": "herder.services.registry.service:RegistryService",
    "jobs": "herder.services.jobs.service:JobsService",
    "queues": "herder.services.queues.service:QueuesService",
    "secrets": "herder.services.secrets.service:SecretsService",
    "storage": "herder.services.storage.service:StorageService",
    "scheduler": "herder.services.scheduler.service:SchedulerService",
}

NAMES: tuple[str, ...] = tuple(_CLASSES)


def service_class(name: str) -> type[Service]:
    """The class of the service called `name` (one of NAMES)."""
    module, _, attribute = _CLASSES[name].partition(":")
    cls: type[Service] = getattr(import_module(module), attribute)
    return cls
