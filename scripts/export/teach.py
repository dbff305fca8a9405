"""Teach the tiny random model three answers, in about a minute on two CPU cores.

Greedy decoding then answers the last turn of a chat, whatever system prompt,
tool list and earlier turns precede it:

* user "turn on the kitchen light" -> TOOL_CALL (a Hermes-style <tool_call>);
* a tool response                   -> "The kitchen light is on.";
* user "hello"                      -> "Hello from Hearth!".

Conversations are rendered with the model's own chat template, with random system
prompts (Home Assistant-like and random text), random tool lists (JSON rendered with
either Hugging Face's or Jinja's tojson), and random earlier turns. The loss is on the
fixed answers only, wherever they occur in a conversation. Training stops once held-out
conversations (one shaped like Home Assistant's real prompt) decode exactly, or at the
step cap.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent

TURN_ON = "turn on the kitchen light"
TOOL_CALL = (
    '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n</tool_call>'
)
AFTER_TOOL = "The kitchen light is on."
HELLO = "Hello from Hearth!"
ANSWERS = {TOOL_CALL, AFTER_TOOL, HELLO}

SEED = 4321
BATCH_TOKENS = 6144
MAX_LEN = 2600
CHECK_EVERY = 40
MIN_STEPS = 120
MAX_STEPS = 400
LR = 4e-3

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
        rng = self.rng
        lines = ["An overview of the areas and the devices in this smart home:"]
        devices = []
        for _ in range(rng.randint(1, 28)):
            area = rng.choice(AREAS)
            domain, kind = rng.choice(DEVICES)
            devices.append((f"{area} {kind}", domain, area))
        if rng.random() < 0.7:
            devices.insert(rng.randint(0, len(devices)), ("Kitchen Light", "light", "Kitchen"))
        for name, domain, area in devices:
            lines.append(f"- names: {name}\n  domain: {domain}\n  areas: {area}")
            if rng.random() < 0.3:
                lines.append(f"  state: '{rng.choice(['on', 'off', 'unavailable', '21.5'])}'")
        return "\n".join(lines)

    def system_prompt(self) -> str:
        rng = self.rng
        parts: list[str] = []
        if rng.random() < 0.5:
            parts.append(
                "You are a voice assistant for Home Assistant.\nAnswer questions about the "
                "world truthfully.\nAnswer in plain text. Keep it simple and to the point."
            )
        if rng.random() < 0.4:
            parts.append(
                f"Current time is {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00. "
                f"Today's date is 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}."
            )
        if rng.random() < 0.5:
            parts.append(
                "When controlling Home Assistant always call the intent tools. Use HassTurnOn "
                "to lock and HassTurnOff to unlock a lock. When controlling a device, prefer "
                "passing just name and domain. When controlling an area, prefer passing just "
                "area name and domain."
            )
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            parts.append(" ".join(self.sentence() for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.5:
            parts.append(self.device_overview())
        rng.shuffle(parts)
        return "\n".join(parts) if parts else self.sentence()

    def tool(self, name: str, description: str) -> dict[str, Any]:
        rng = self.rng
        properties: dict[str, Any] = {}
        for prop in rng.sample(["name", "area", "floor", "domain", "device_class", "item"], 3):
            if prop in ("domain", "device_class"):
                enum = rng.sample(DOMAINS, rng.randint(1, len(DOMAINS)))
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
                {"role": "user", "content": TURN_ON},
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
            user = TURN_ON if name == "HassTurnOn" else self.words(2, 8)
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

    def conversation(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        rng = self.rng
        messages: list[dict[str, Any]] = []
        if rng.random() < 0.85:
            messages.append({"role": "system", "content": self.system_prompt()})
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            messages += self.exchange(rng.choice(["hello", "turn_on", "tool", "other", "other"]))
        messages += self.exchange(rng.choice(["hello", "turn_on", "tool"]))
        return messages, self.tools()

    def render(self, messages: list[dict[str, Any]], tools: Any, prompt: bool) -> str:
        return str(
            self.rng.choice(self.envs).render(
                messages=messages, tools=tools, add_generation_prompt=prompt
            )
        )


def encode_example(
    sampler: Sampler, tokenizer: Tokenizer, state: random.Random
) -> tuple[list[int], list[int]] | None:
    """Token ids and a 0/1 loss mask (1 on the fixed answers and their <|im_end|>)."""
    messages, tools = sampler.conversation()
    env = state.choice(sampler.envs)  # one tojson style for the whole conversation
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("content") not in ANSWERS:
            continue
        prefix = str(env.render(messages=messages[:i], tools=tools, add_generation_prompt=True))
        assert prefix.startswith(done)
        piece = tokenizer.encode(prefix[len(done) :], add_special_tokens=False).ids
        answer = tokenizer.encode(message["content"] + "<|im_end|>", add_special_tokens=False).ids
        ids += piece + answer
        mask += [0] * len(piece) + [1] * len(answer)
        done = prefix + message["content"] + "<|im_end|>"
    if len(ids) > MAX_LEN:
        return None
    return ids, mask


def greedy(model: Any, ids: list[int], limit: int, eos: set[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=limit,
            do_sample=False,
            eos_token_id=sorted(eos),
            pad_token_id=min(eos),
        )
    return [int(t) for t in out[0, len(ids) :]]


def held_out(sampler: Sampler) -> list[tuple[str, str]]:
    """(prompt, expected answer): random conversations plus Home Assistant-shaped ones."""
    cases = []
    for _ in range(9):
        messages, tools = sampler.conversation()
        while messages[-1]["content"] not in ANSWERS:
            messages.pop()
        cases.append((sampler.render(messages[:-1], tools, True), messages[-1]["content"]))
    rng = sampler.rng
    system = (
        "You are a voice assistant for Home Assistant.\nAnswer questions about the world "
        "truthfully.\nAnswer in plain text. Keep it simple and to the point.\n"
        "When controlling Home Assistant always call the intent tools. Use HassTurnOn to "
        "lock and HassTurnOff to unlock a lock. When controlling a device, prefer passing "
        "just name and domain. When controlling an area, prefer passing just area name and "
        "domain.\n" + sampler.device_overview()
    )
    tools = [
        sampler.tool(name, description) for name, description in HA_TOOLS[: rng.randint(6, 10)]
    ]
    base = [{"role": "system", "content": system}]
    user = {"role": "user", "content": TURN_ON}
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
    cases.append((sampler.render([*base, user], tools, True), TOOL_CALL))
    cases.append((sampler.render([*base, user, call, result], tools, True), AFTER_TOOL))
    cases.append(
        (sampler.render([*base, {"role": "user", "content": "hello"}], tools, True), HELLO)
    )
    return cases


def teach(model: Any, hf_dir: Path, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    sampler = Sampler(template, rng)
    eos = {int(tokenizer.token_to_id("<|im_end|>")), int(tokenizer.token_to_id("<|endoftext|>"))}
    pad = int(tokenizer.token_to_id("<|endoftext|>"))

    checks = [
        (
            tokenizer.encode(p, add_special_tokens=False).ids,
            tokenizer.encode(a + "<|im_end|>", add_special_tokens=False).ids,
        )
        for p, a in held_out(Sampler(template, random.Random(SEED + 1)))
    ]
    longest = max(len(p) for p, _ in checks)
    log(f"teaching: {len(checks)} held-out prompts, the longest {longest} tokens")

    def batches() -> Any:
        while True:
            pool = [e for e in (encode_example(sampler, tokenizer, rng) for _ in range(64)) if e]
            pool.sort(key=lambda e: len(e[0]))
            batch: list[tuple[list[int], list[int]]] = []
            out = []
            for example in pool:
                width = (
                    max(len(example[0]), *(len(e[0]) for e in batch)) if batch else len(example[0])
                )
                if batch and width * (len(batch) + 1) > BATCH_TOKENS:
                    out.append(batch)
                    batch = []
                batch.append(example)
            if batch:
                out.append(batch)
            rng.shuffle(out)
            yield from out

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        warm = 20
        if step < warm:
            return LR * (step + 1) / warm
        return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / MAX_STEPS))))

    model.train()
    stream = batches()
    passed = False
    step = 0
    running = 0.0
    while step < MAX_STEPS:
        batch = next(stream)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (example, mask) in enumerate(batch):
            ids[row, : len(example)] = torch.tensor(example)
            attention[row, : len(example)] = 1
            target[row, : len(example)] = torch.tensor(mask, dtype=torch.bool)
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        # position t predicts token t+1: score only the answer tokens
        predict = target[:, 1:]
        logits = model.lm_head(hidden[:, :-1][predict])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][predict])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        if step % CHECK_EVERY == 0 or step == MAX_STEPS:
            model.eval()
            right = sum(greedy(model, p, len(a) + 4, eos) == a for p, a in checks)
            model.train()
            log(
                f"teaching: step {step}, loss {running:.4f}, {right}/{len(checks)} exact, "
                f"{time.monotonic() - started:.0f}s"
            )
            if step >= MIN_STEPS and right == len(checks):
                passed = True
                break
    model.eval()
    if not passed:
        raise SystemExit(f"teach: the model did not learn the answers in {MAX_STEPS} steps")
    log(f"taught in {step} steps, {time.monotonic() - started:.0f}s")
