"""A generated Home-Assistant-shaped Assist prompt: instructions, ~46 entities, 12 intent tools.

Shaped like what Home Assistant's Assist API sends (its system prompt, the exposed
entities with their areas and states as YAML, and the intent tools), so a
benchmark sees the prompt lengths and the stable-first layout of a real household.
`household(seed)` varies the home's name (the first line): each seed is a prompt
no cache has seen.
"""

from __future__ import annotations

from typing import Any

AREAS = ["Kitchen", "Living Room", "Bedroom", "Office", "Hallway", "Garage", "Garden", "Bathroom"]
KINDS = [
    ("light", "Light", ["on", "off"]),
    ("switch", "Plug", ["on", "off"]),
    ("sensor", "Temperature", ["19.5 °C", "21.0 °C", "22.5 °C"]),
    ("cover", "Blinds", ["open", "closed"]),
    ("climate", "Thermostat", ["heat", "off"]),
    ("media_player", "Speaker", ["idle", "playing"]),
]
ENTITY_COUNT = 46

# The intent tools Home Assistant offers (names as HA's intents); arguments as HA shapes them.
_NAME_AREA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "area": {"type": "string"},
    },
}
INTENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("HassTurnOn", "Turns on/opens a device or entity", _NAME_AREA),
    ("HassTurnOff", "Turns off/closes a device or entity", _NAME_AREA),
    ("HassToggle", "Toggles a device or entity", _NAME_AREA),
    (
        "HassLightSet",
        "Sets the brightness or color of a light",
        {
            "type": "object",
            "properties": {
                **_NAME_AREA["properties"],
                "brightness": {"type": "integer"},
            },
        },
    ),
    (
        "HassClimateSetTemperature",
        "Sets the desired temperature",
        {
            "type": "object",
            "properties": {
                "area": {"type": "string"},
                "temperature": {"type": "number"},
            },
            "required": ["temperature"],
        },
    ),
    ("HassClimateGetTemperature", "Gets the current temperature", _NAME_AREA),
    (
        "HassSetPosition",
        "Sets the position of a device or entity",
        {
            "type": "object",
            "properties": {
                **_NAME_AREA["properties"],
                "position": {"type": "integer"},
            },
            "required": ["position"],
        },
    ),
    ("HassMediaPause", "Pauses a media player", _NAME_AREA),
    ("HassMediaUnpause", "Resumes a media player", _NAME_AREA),
    (
        "HassSetVolume",
        "Sets the volume of a media player",
        {
            "type": "object",
            "properties": {
                **_NAME_AREA["properties"],
                "volume_level": {"type": "integer"},
            },
            "required": ["volume_level"],
        },
    ),
    (
        "HassStartTimer",
        "Starts a new timer",
        {
            "type": "object",
            "properties": {
                "minutes": {"type": "integer"},
            },
        },
    ),
    (
        "GetLiveContext",
        "Provides real-time information about the devices' states",
        {
            "type": "object",
            "properties": {},
        },
    ),
]


def entities() -> list[dict[str, str]]:
    """The exposed entities: (entity_id, name, area, state), deterministic."""
    out = []
    for i in range(ENTITY_COUNT):
        domain, label, states = KINDS[i % len(KINDS)]
        area = AREAS[(i // len(KINDS)) % len(AREAS)]
        slug = area.lower().replace(" ", "_")
        out.append(
            {
                "entity_id": f"{domain}.{slug}_{label.lower()}_{i}",
                "name": f"{area} {label} {i // len(KINDS) + 1}",
                "area": area,
                "state": states[i % len(states)],
            }
        )
    return out


def tools() -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": name, "description": description, "parameters": parameters},
        }
        for name, description, parameters in INTENTS
    ]


def system_prompt(seed: int) -> str:
    """Home Assistant's Assist prompt for a home: instructions, then the entities."""
    lines = [
        f"Home {seed:04d}. You are a voice assistant for Home Assistant.",
        "Answer questions about the world truthfully.",
        "Answer in plain text. Keep it simple and to the point.",
        "When controlling Home Assistant always call the intent tools. "
        "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
        "When controlling a device, prefer passing just name and domain. "
        "When controlling an area, prefer passing just area name and domain.",
        "Devices change only through tools: never say a device changed without a tool call.",
        "When a user asks to turn on all devices of a specific type, "
        "ask user to specify an area, unless there is only one device of that type.",
        "An overview of the areas and the devices in this smart home:",
    ]
    for entity in entities():
        lines.append(f"- {entity['name']}: {entity['state']}")
    return "\n".join(lines)


# Spoken commands of a conversation, and canned answers as the assistant gave them.
TURNS = [
    ("Turn on the kitchen light", "The kitchen light is on."),
    ("And dim it to thirty percent", "Done, the kitchen light is at 30%."),
    ("What is the temperature in the office?", "It is 21 degrees in the office."),
    ("Close the bedroom blinds", "The bedroom blinds are closed."),
]
OTHER_MEMBER = "Pause the speaker in the living room"


def messages(seed: int, turns: int, *, first: str | None = None) -> list[dict[str, Any]]:
    """A conversation's messages for its turn number `turns` (1-based)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(seed)}]
    for i in range(turns):
        user, answer = TURNS[i]
        if i == 0 and first is not None:
            user = first
        out.append({"role": "user", "content": user})
        if i < turns - 1:
            out.append({"role": "assistant", "content": answer})
    return out
