"""Conversations for teaching the tiny test model (see teach.py); no torch here.

The tests import this module too (from the worker's Python 3.13 environment), to
check the exported model on conversations it was not trained on.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

TURN_ON = "turn on the kitchen light"
# The command as it comes: typed, or as speech-to-text writes it (Whisper: a capital,
# a full stop). All are taught: a voice turn must not depend on how it was written.
TURN_ON_FORMS = (
    TURN_ON,
    "turn on the kitchen light.",
    "Turn on the kitchen light.",
    "Turn on the kitchen light",
)
TOOL_CALL = (
    '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n</tool_call>'
)
AFTER_TOOL = "The kitchen light is on."
HELLO = "Hello from Hearth!"
ANSWERS = {TOOL_CALL, AFTER_TOOL, HELLO}

# Home Assistant's own prompt text (homeassistant/helpers/llm.py, 2025.4), so the taught
# model sees what the integration sends.
HA_INSTRUCTIONS = """You are a voice assistant for Home Assistant.
Answer questions about the world truthfully.
Answer in plain text. Keep it simple and to the point.
"""
HA_API_PREAMBLE = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain."
)
HA_AREA_LINES = [
    "When a user asks to turn on all devices of a specific type, "
    "ask user to specify an area, unless there is only one device of that type.",
    "You are in area Kitchen and all generic commands like 'turn on the lights' should "
    "target this area.",
    "You are in area Living Room (floor Ground Floor) and all generic commands like 'turn on "
    "the lights' should target this area.",
]
HA_LIVE_CONTEXT = """You ARE equipped to answer questions about the current state of
the home using the `GetLiveContext` tool. This is a primary function. Do not state you lack the
functionality if the question requires live data.
If the user asks about device existence/type (e.g., "Do I have lights in the bedroom?"): Answer
from the static context below.
If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock locked?",
"Is the fan on?", "What mode is the thermostat in?", "What is the temperature outside?"):
    1.  Recognize this requires live data.
    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time information (like temperature from the local weather, lock status, etc.).
    3.  Use the tool's response** to answer the user accurately (e.g., "The temperature outside is [value from tool].").
For general knowledge questions not about the home: Answer truthfully from internal knowledge.
"""  # noqa: E501
HA_NO_ENTITIES = (
    "Only if the user wants to control a device, tell them to expose entities "
    "to their voice assistant in Home Assistant."
)
DEVICE_CLASSES = (
    "awning blind curtain damper door garage gate shade shutter window tv speaker receiver "
    "outlet switch water gas"
).split()

WORDS = (
    "the a an of to in on for with and or but not is are was be can will you your my our "
    "home house room light lamp fan door lock window blind cover heater thermostat sensor "
    "switch plug speaker tv media player garage garden porch hall kitchen bedroom bathroom "
    "office living dining basement attic stairs floor area device entity state value "
    "please answer question world truthfully plain text simple point voice assistant "
    "control always call tools intent prefer passing name domain when user asks turn off "
    "open close set brightness color temperature timer minutes hours today time date "
    "weather forecast rain sun cloudy warm cold morning evening night schedule scene "
    "script automation music volume play pause next previous battery level energy power "
    "usage report status check list add item shopping todo remind me about it this that "
    "there here now later soon again also only all every some any none more less very "
    "quick short long good bad new old big small red green blue white warm cool bright dim"
).split()
AREAS = [
    "Kitchen",
    "Living Room",
    "Bedroom",
    "Office",
    "Garage",
    "Hallway",
    "Bathroom",
    "Garden",
    "Attic",
    "Basement",
    "Porch",
    "Dining Room",
]
DEVICES = [
    ("light", "Light"),
    ("light", "Ceiling Light"),
    ("light", "Lamp"),
    ("switch", "Switch"),
    ("fan", "Fan"),
    ("cover", "Blinds"),
    ("lock", "Door Lock"),
    ("climate", "Thermostat"),
    ("media_player", "Speaker"),
    ("sensor", "Temperature"),
    ("binary_sensor", "Motion"),
]
DOMAINS = [
    "light",
    "switch",
    "fan",
    "cover",
    "lock",
    "climate",
    "media_player",
    "sensor",
    "binary_sensor",
    "scene",
    "script",
    "valve",
    "vacuum",
    "water_heater",
    "humidifier",
    "button",
    "input_boolean",
]
HA_TOOLS = [
    ("HassTurnOn", "Turns on/opens/presses a device or entity"),
    ("HassTurnOff", "Turns off/closes a device or entity"),
    ("HassLightSet", "Sets the brightness percentage or color of a light"),
    ("HassSetPosition", "Sets the position of a device or entity"),
    ("HassCancelAllTimers", "Cancels all timers"),
    ("HassBroadcast", "Broadcast a message through the home"),
    ("HassListAddItem", "Add item to a todo list"),
    ("HassListCompleteItem", "Complete an item on a todo list"),
    ("HassMediaPause", "Pauses a media player"),
    ("HassMediaUnpause", "Resumes a media player"),
    ("HassMediaNext", "Skips a media player to the next item"),
    ("HassSetVolume", "Sets the volume percentage of a media player"),
    ("HassClimateSetTemperature", "Sets the target temperature of a climate device"),
    ("HassVacuumStart", "Starts a vacuum"),
    ("GetLiveContext", "Provides real-time information about the CURRENTLY state of devices"),
    ("GetDateTime", "Provides the current date and time"),
    ("todo_get_items", "Query a to-do list to find out what items are on it"),
]


class Sampler:
    """Random conversations rendered with the model's chat template."""

    def __init__(self, template: str, rng: random.Random) -> None:
        self.rng = rng
        self.envs = []
        for style in ("hf", "jinja"):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            if style == "hf":  # transformers' tojson: insertion order, no HTML escaping
                env.filters["tojson"] = lambda v, indent=None: json.dumps(
                    v, ensure_ascii=False, indent=indent
                )
            self.envs.append(env.from_string(template))

    # -- text pieces
    def words(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def sentence(self) -> str:
        text = self.words(3, 14)
        return text[:1].upper() + text[1:] + self.rng.choice([".", ".", "!", "?", ":"])

    def device_overview(self) -> str:
        """Exposed entities the way Home Assistant dumps them (YAML)."""
        rng = self.rng
        devices = []
        for _ in range(rng.randint(1, 24)):
            area = rng.choice(AREAS)
            domain, kind = rng.choice(DEVICES)
            devices.append((f"{area} {kind}", domain, area))
        if rng.random() < 0.7:
            devices.insert(rng.randint(0, len(devices)), ("Kitchen Light", "light", "Kitchen"))
        lines = []
        for name, domain, area in devices:
            fields = [f"names: {name}", f"domain: {domain}"]
            if rng.random() < 0.6:
                fields.append(f"state: '{rng.choice(['on', 'off', 'unavailable', '21.5'])}'")
            if rng.random() < 0.8:
                fields.append(f"areas: {area}")
            if domain == "light" and rng.random() < 0.3:
                fields.append(f"attributes:\n    brightness: '{rng.randint(0, 255)}'")
            lines.append("- " + "\n  ".join(fields))
        return (
            "Static Context: An overview of the areas and the devices in this smart home:\n"
            + "\n".join(lines)
            + "\n"
        )

    def system_prompt(self) -> str:
        rng = self.rng
        if rng.random() < 0.3:
            return self.sentence() if rng.random() < 0.5 else self.words(1, 30)
        return self.ha_system_prompt(full=False)

    def ha_system_prompt(self, full: bool) -> str:
        """Home Assistant's conversation prompt (2025.x): instructions, time, the Assist
        API preamble, live-context advice, and the exposed entities as YAML."""
        rng = self.rng

        def some(p: float) -> bool:
            return full or rng.random() < p

        parts: list[str] = []
        if some(0.6):
            parts.append(HA_INSTRUCTIONS if full or rng.random() < 0.7 else self.sentence() + "\n")
        for _ in range(0 if full else rng.choice([0, 0, 0, 1, 3])):
            parts.append(" ".join(self.sentence() for _ in range(rng.randint(1, 4))))
        if some(0.5):
            parts.append(
                f"Current time is {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}. Today's date is "
                f"20{rng.randint(24, 27)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}.\n"
            )
        if some(0.6):
            parts.append(HA_API_PREAMBLE)
            parts.append(rng.choice(HA_AREA_LINES) if not full else HA_AREA_LINES[0])
            if some(0.7):
                parts.append("This device is not able to start timers.")
            if some(0.6):
                parts.append(HA_LIVE_CONTEXT)
        if some(0.6):
            parts.append(self.device_overview())
        elif rng.random() < 0.3:
            parts.append(HA_NO_ENTITIES)
        return "\n".join(parts) if parts else self.sentence()

    def tool(self, name: str, description: str) -> dict[str, Any]:
        rng = self.rng
        properties: dict[str, Any] = {}
        for prop in rng.sample(["name", "area", "floor", "domain", "device_class", "item"], 3):
            if prop in ("domain", "device_class"):
                values = DOMAINS if prop == "domain" else DEVICE_CLASSES
                enum = rng.sample(values, rng.randint(1, len(values)))
                properties[prop] = {"type": "array", "items": {"type": "string", "enum": enum}}
            else:
                properties[prop] = {"type": "string"}
        function = {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": []},
        }
        return {"type": "function", "function": function} if rng.random() < 0.8 else function

    def tools(self) -> list[dict[str, Any]] | None:
        rng = self.rng
        if rng.random() < 0.25:
            return None
        pool = [
            *HA_TOOLS,
            *((self.words(1, 1).title() + "Tool", self.sentence()) for _ in range(3)),
        ]
        chosen = rng.sample(pool, rng.randint(1, min(12, len(pool))))
        return [self.tool(name, description) for name, description in chosen]

    def tool_result(self) -> str:
        rng = self.rng
        if rng.random() < 0.5:
            return json.dumps(
                {
                    "speech": {},
                    "response_type": "action_done",
                    "data": {
                        "targets": [],
                        "success": [
                            {"name": "Kitchen Light", "type": "entity", "id": "light.kitchen"}
                        ],
                        "failed": [],
                    },
                }
            )
        return json.dumps({self.words(1, 1): self.words(1, 4) for _ in range(rng.randint(1, 4))})

    # -- conversations
    def exchange(self, kind: str) -> list[dict[str, Any]]:
        rng = self.rng
        if kind == "hello":
            return [{"role": "user", "content": "hello"}, {"role": "assistant", "content": HELLO}]
        if kind == "turn_on":
            return [
                {"role": "user", "content": rng.choice(TURN_ON_FORMS)},
                {"role": "assistant", "content": TOOL_CALL},
            ]
        if kind == "tool":
            arguments: Any = {"name": "kitchen light"}
            name = "HassTurnOn"
            if rng.random() < 0.2:
                name = rng.choice(HA_TOOLS)[0]
                arguments = {"name": self.words(1, 2)}
            if rng.random() < 0.5:
                arguments = json.dumps(arguments)  # OpenAI style: a JSON string
            call = {"name": name, "arguments": arguments}
            if rng.random() < 0.7:
                call = {"id": "call_1", "type": "function", "function": call}
            user = rng.choice(TURN_ON_FORMS) if name == "HassTurnOn" else self.words(2, 8)
            return [
                {"role": "user", "content": user},
                {"role": "assistant", "content": rng.choice([None, ""]), "tool_calls": [call]},
                {"role": "tool", "content": self.tool_result()},
                {"role": "assistant", "content": AFTER_TOOL},
            ]
        return [
            {"role": "user", "content": self.words(1, 12)},
            {"role": "assistant", "content": self.words(1, 20)},
        ]

    def note(self) -> str:
        """Hearth's note before a user turn (custom_components/hearth/assistant.py,
        request_messages): the time, maybe the speaking device's area, maybe what the
        member prefers."""
        rng = self.rng
        parts = []
        if rng.random() < 0.3:
            parts.append(self.sentence())
        if rng.random() < 0.3:
            parts.append(rng.choice(HA_AREA_LINES[1:]))
        parts.append(
            f"Current time is {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
            f"{rng.randint(0, 59):02d}. Today's date is "
            f"20{rng.randint(24, 27)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}."
        )
        return "\n".join(parts)

    def noted(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` laid out as Hearth sends them: a note before every user turn."""
        out: list[dict[str, Any]] = []
        for message in messages:
            if message["role"] == "user":
                out.append({"role": "system", "content": self.note()})
            out.append(message)
        return out

    def conversation(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        rng = self.rng
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.85:
            messages.append({"role": "system", "content": self.system_prompt()})
        for _ in range(rng.randint(0, 6)):
            messages += self.exchange(rng.choice(["hello", "turn_on", "tool", "other"]))
        messages += self.exchange(rng.choice(["hello", "turn_on", "tool"]))
        if rng.random() < 0.5:
            messages = self.noted(messages)
        return messages, self.tools()

    def render(
        self, messages: list[dict[str, Any]], tools: Any, prompt: bool, env: Any = None
    ) -> str:
        """The chat rendered with `env` (one of `envs`), else a random one."""
        env = env or self.rng.choice(self.envs)
        return str(env.render(messages=messages, tools=tools, add_generation_prompt=prompt))


def without_time(system: str) -> str:
    """Home Assistant's prompt (`ha_system_prompt`) as Hearth sends it for every turn:
    the time line cut out (it goes into each turn's note)."""
    return re.sub(r"Current time is [^\n]*\n", "", system)


def held_out(sampler: Sampler) -> list[tuple[str, str]]:
    """(prompt, expected answer): random conversations plus Home Assistant-shaped ones."""
    cases = []
    for _ in range(9):
        messages, tools = sampler.conversation()
        while messages[-1]["content"] not in ANSWERS:
            messages.pop()
        cases.append((sampler.render(messages[:-1], tools, True), messages[-1]["content"]))
    return cases + home_assistant_held_out(sampler)


def home_assistant_held_out(sampler: Sampler) -> list[tuple[str, str]]:
    """(prompt, expected answer) with Home Assistant's full prompt and 12 of its tools:
    the three answers as Home Assistant 2025.4 lays the prompt out (the time in it), then
    as Hearth sends it (the time in a note before the user's turn, which is typed or
    spoken)."""
    rng = sampler.rng
    system = sampler.ha_system_prompt(full=True)
    tools = [sampler.tool(name, description) for name, description in HA_TOOLS[:12]]
    rng.shuffle(tools)
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "HassTurnOn", "arguments": '{"name": "kitchen light"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": sampler.tool_result()}
    hello = {"role": "user", "content": "hello"}
    home_assistant = [{"role": "system", "content": system}]
    household = [{"role": "system", "content": without_time(system)}]
    note = {"role": "system", "content": sampler.note()}
    cases = []
    for before, user in (
        (home_assistant, {"role": "user", "content": TURN_ON}),
        ([*household, note], {"role": "user", "content": rng.choice(TURN_ON_FORMS)}),
    ):
        env = rng.choice(sampler.envs)  # one household's requests render their tools alike
        cases.append((sampler.render([*before, user], tools, True, env), TOOL_CALL))
        cases.append((sampler.render([*before, user, call, result], tools, True, env), AFTER_TOOL))
        cases.append((sampler.render([*before, hello], tools, True, env), HELLO))
    return cases
