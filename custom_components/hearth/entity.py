"""Base entity: one device per worker."""

from __future__ import annotations

from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.update_coordinator import CoordinatorEntity

from .const import DOMAIN
from .coordinator import HearthCoordinator


class HearthWorkerEntity(CoordinatorEntity[HearthCoordinator]):
    """An entity of one worker's device."""

    _attr_has_entity_name = True

    def __init__(self, coordinator: HearthCoordinator, key: str) -> None:
        super().__init__(coordinator)
        info = coordinator.info
        self._attr_unique_id = f"{info.node_id}_{key}"
        self._attr_translation_key = key
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, info.node_id)},
            name=info.name,
            manufacturer="Hearth",
            model="Hearth worker",
            sw_version=info.version,
            configuration_url=coordinator.configuration_url,
        )
