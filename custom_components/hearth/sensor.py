"""Capacity sensors of one worker.

Most follow the worker's capacity snapshot (polled); running and queued requests
also follow Hearth's own requests to it as they start and end (`live`), between
polls (coordinator.py `load`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import UnitOfInformation
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from .coordinator import HearthCoordinator
from .entity import HearthWorkerEntity
from .worker_api import Capacity

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0


def _decode_rate(capacity: Capacity) -> float | None:
    rates = [m.decode_tok_s for m in capacity.models.values() if m.decode_tok_s is not None]
    return round(max(rates), 1) if rates else None


@dataclass(frozen=True, kw_only=True)
class HearthSensorDescription(SensorEntityDescription):
    """A capacity sensor: how to read its value."""

    value_fn: Callable[[HearthCoordinator], float | int | None]
    attrs_fn: Callable[[Capacity], dict[str, Any]] | None = None
    # Also updated when one of Hearth's own requests to the worker starts or ends.
    live: bool = False


SENSORS: tuple[HearthSensorDescription, ...] = (
    HearthSensorDescription(
        key="running",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: c.load()[0],
        live=True,
    ),
    HearthSensorDescription(
        key="queued",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: c.load()[1],
        live=True,
    ),
    HearthSensorDescription(
        key="decode_rate",
        native_unit_of_measurement="tokens/s",
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        value_fn=lambda c: _decode_rate(c.data),
    ),
    HearthSensorDescription(
        key="loaded_models",
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda c: len(c.data.models),
        attrs_fn=lambda c: {"models": sorted(c.models)},
    ),
    HearthSensorDescription(
        key="memory_free",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.MEGABYTES,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=0,
        value_fn=lambda c: c.data.memory_free_mb,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    coordinator = entry.runtime_data.coordinator
    async_add_entities(HearthSensor(coordinator, description) for description in SENSORS)


class HearthSensor(HearthWorkerEntity, SensorEntity):
    """One number from the worker's capacity snapshot; unavailable while it is gone."""

    entity_description: HearthSensorDescription

    def __init__(
        self, coordinator: HearthCoordinator, description: HearthSensorDescription
    ) -> None:
        super().__init__(coordinator, description.key)
        self.entity_description = description

    async def async_added_to_hass(self) -> None:
        await super().async_added_to_hass()
        if self.entity_description.live:
            self.async_on_remove(
                async_dispatcher_connect(
                    self.hass, self.coordinator.signal_in_flight, self._in_flight_changed
                )
            )

    @callback
    def _in_flight_changed(self) -> None:
        self.async_write_ha_state()

    @property
    def native_value(self) -> float | int | None:
        return self.entity_description.value_fn(self.coordinator)

    @property
    def extra_state_attributes(self) -> dict[str, Any] | None:
        if self.entity_description.attrs_fn is None:
            return None
        return self.entity_description.attrs_fn(self.coordinator.data)
