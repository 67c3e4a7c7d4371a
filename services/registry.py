"""The services herder can run, by name."""

from __future__ import annotations

from herder.services.auth.service import AuthService
from herder.services.common.runtime import Service

SERVICES: dict[str, type[Service]] = {
    AuthService.name: AuthService,
}
