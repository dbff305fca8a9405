"""Tool calls on 50 varied household commands: do they parse, validate, pick the right tool?

The tool-call part of scripts/bench_voice (its voice.py calls `measure_tool_calls`);
runs on its own too:

    .venv/bin/python scripts/bench/voice_tools.py [--model FOLDER] [--limit N] [--json]

Each command goes, as Home Assistant's Assist sends it (the household prompt of
voice_prompt.py, its 12 intent tools, temperature 0), to a worker through the
`openai` client, twice:

* ``tool_choice: "auto"``, as Assist asks: the model may answer in words. A device
  command answered without a tool call is counted (``device_commands_without_call``):
  the light stays off.
* ``tool_choice: "required"``: a call is forced; which tool did the model pick?

Figures:

* ``tool_call_valid_rate``: of all tool calls returned (both passes), those whose name
  is an offered tool and whose arguments are a JSON object valid against that tool's
  schema (jsonschema), whatever the tool. Target 1.0 (the worker's guidance).
* ``tool_call_right_rate``: commands whose first call (auto) names the tool the command
  asks for; ``tool_call_right_rate_required`` the same when a call is forced.
  Reported, not gated: it measures the model.
* ``tool_calls``, ``commands_answered_with_call``, ``device_commands_without_call``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import voice_prompt  # noqa: E402

TARGET_VALID_RATE = 1.0
# Enough for a call with its arguments (about 30 tokens with SmolLM2's tokenizer).
AUTO_MAX_TOKENS = 48
REQUIRED_MAX_TOKENS = 64


@dataclass(frozen=True)
class Command:
    text: str
    tool: str  # the intent tool the command asks for
    device: bool = True  # it changes a device (a call is the only right answer)


def _names(domain: str) -> list[str]:
    return [e["name"] for e in voice_prompt.entities() if e["entity_id"].startswith(domain + ".")]


def commands() -> list[Command]:
    """50 household commands, varied in wording, device and intent; deterministic."""
    lights, plugs = _names("light"), _names("switch")
    covers, speakers = _names("cover"), _names("media_player")
    areas = voice_prompt.AREAS
    out: list[Command] = []
    for i, name in enumerate(lights[:5]):
        wording = [
            "Turn on the {}",
            "Switch on {}",
            "Please turn the {} on",
            "{} on",
            "Light up {}",
        ]
        out.append(Command(wording[i].format(name), "HassTurnOn"))
    for i, name in enumerate(lights[3:8]):
        wording = ["Turn off the {}", "Switch off {}", "Kill the {}", "{} off please", "Shut {}"]
        out.append(Command(wording[i].format(name), "HassTurnOff"))
    for i, name in enumerate(plugs[:4]):
        wording = ["Turn on {}", "Power up the {}", "Turn off {}", "Cut power to the {}"]
        out.append(Command(wording[i].format(name), "HassTurnOn" if i < 2 else "HassTurnOff"))
    for i, name in enumerate(plugs[4:7]):
        wording = ["Toggle {}", "Flip the {}", "Toggle the {}"]
        out.append(Command(wording[i].format(name), "HassToggle"))
    for i, (name, level) in enumerate(zip(lights[:5], (30, 75, 10, 50, 100), strict=True)):
        wording = [
            "Dim the {} to {} percent",
            "Set {} brightness to {}%",
            "Make the {} {} percent bright",
            "Brightness of {} at {}",
            "Set the {} to {}% brightness",
        ]
        out.append(Command(wording[i].format(name, level), "HassLightSet"))
    for i, (area, degrees) in enumerate(zip(areas[:4], (21, 19.5, 23, 18), strict=True)):
        wording = [
            "Set the {} to {} degrees",
            "Heat the {} to {}",
            "Make it {1} degrees in the {0}",
            "Thermostat in the {} to {} please",
        ]
        out.append(Command(wording[i].format(area, degrees), "HassClimateSetTemperature"))
    for i, area in enumerate(areas[2:5]):
        wording = [
            "What is the temperature in the {}?",
            "How warm is the {}?",
            "Is it cold in the {}?",
        ]
        out.append(Command(wording[i].format(area), "HassClimateGetTemperature", device=False))
    for i, (name, position) in enumerate(zip(covers[:4], (50, 0, 100, 25), strict=True)):
        wording = [
            "Open the {} halfway",
            "Set {} position to {}",
            "Move the {} to {} percent",
            "Set the {} to {}% open",
        ]
        text = wording[i].format(name, position) if i else wording[0].format(name)
        out.append(Command(text, "HassSetPosition"))
    for i, name in enumerate(covers[4:7]):
        wording = ["Open the {}", "Close the {}", "Shut the {}"]
        out.append(Command(wording[i].format(name), "HassTurnOn" if i == 0 else "HassTurnOff"))
    for i, name in enumerate(speakers[:3]):
        wording = ["Pause the {}", "Stop the music on {}", "Pause {}"]
        out.append(Command(wording[i].format(name), "HassMediaPause"))
    for i, name in enumerate(speakers[3:5]):
        out.append(Command(["Resume the {}", "Unpause {}"][i].format(name), "HassMediaUnpause"))
    for i, (name, volume) in enumerate(zip(speakers[:3], (20, 50, 80), strict=True)):
        wording = ["Set the {} volume to {}", "Volume {} on {}", "Turn the {} to {} percent volume"]
        text = wording[i].format(volume, name) if i == 1 else wording[i].format(name, volume)
        out.append(Command(text, "HassSetVolume"))
    for i, minutes in enumerate((5, 10, 25)):
        wording = ["Set a timer for {} minutes", "Start a {} minute timer", "Timer {} minutes"]
        out.append(Command(wording[i].format(minutes), "HassStartTimer"))
    for i, name in enumerate(plugs[:2] + lights[5:6]):
        wording = [
            "Is the {} on?",
            "What state is the {} in?",
            "Is {} off?",
            "Tell me if the {} is on",
        ]
        out.append(Command(wording[i].format(name), "GetLiveContext", device=False))
    return out


def _schemas() -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"]["parameters"] for t in voice_prompt.tools()}


def valid_call(call: Any, schemas: dict[str, dict[str, Any]]) -> bool:
    """An offered tool, and arguments that are a JSON object valid against its schema."""
    function = getattr(call, "function", None)
    name = getattr(function, "name", None)
    if name not in schemas:
        return False
    try:
        arguments = json.loads(function.arguments)
    except (TypeError, ValueError):
        return False
    if not isinstance(arguments, dict):
        return False
    try:
        jsonschema.validate(arguments, schemas[name])
    except jsonschema.ValidationError:
        return False
    return True


async def _ask(
    client: openai.AsyncOpenAI, model: str, command: Command, tool_choice: str
) -> tuple[list[Any], str]:
    messages = voice_prompt.messages(1, 1, first=command.text)
    answer = await client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        tools=voice_prompt.tools(),  # type: ignore[arg-type]
        tool_choice=tool_choice,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=AUTO_MAX_TOKENS if tool_choice == "auto" else REQUIRED_MAX_TOKENS,
    )
    message = answer.choices[0].message
    return list(message.tool_calls or []), message.content or ""


async def measure_tool_calls(
    client: openai.AsyncOpenAI,
    model: str,
    *,
    limit: int | None = None,
    stride: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """The figures above, for `model` served where `client` points (every `stride`-th
    command, at most `limit`: a quicker look, still across the intents)."""
    schemas = _schemas()
    asked = commands()[::stride][:limit]
    valid = total = right = right_required = with_call = without_call = 0
    for command in asked:
        calls, text = await _ask(client, model, command, "auto")
        forced, _ = await _ask(client, model, command, "required")
        total += len(calls) + len(forced)
        valid += sum(valid_call(c, schemas) for c in calls + forced)
        if calls:
            with_call += 1
            right += calls[0].function.name == command.tool
        elif command.device:
            without_call += 1
        right_required += bool(forced) and forced[0].function.name == command.tool
        if verbose:
            said = ", ".join(f"{c.function.name}{c.function.arguments}" for c in calls)
            picked = ", ".join(f"{c.function.name}{c.function.arguments}" for c in forced)
            print(
                f"{command.text!r} ({command.tool}): auto {said or repr(text[:60])}; "
                f"required {picked or '-'} [so far: {valid}/{total} valid, {right} right, "
                f"{right_required} right when required, {without_call} device commands "
                "without a call]",
                flush=True,
            )
    return {
        "tool_call_commands": len(asked),
        "tool_calls": total,
        "tool_call_valid_rate": valid / total if total else None,
        "tool_call_right_rate": right / len(asked),
        "tool_call_right_rate_required": right_required / len(asked),
        "commands_answered_with_call": with_call,
        "device_commands_without_call": without_call,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="model folder (default: the real SmolLM2)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N commands")
    parser.add_argument("--stride", type=int, default=1, help="every Nth command only")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    from worker_process import start_worker  # tests/

    if args.model is None:
        import model_fixtures  # tests/: builds the real model once, then reuses it

        args.model = model_fixtures.real_chat_model()
    name = json.loads((args.model / "hearth-model.json").read_text())["name"]

    async def run(url: str, token: str | None, verify: Any) -> dict[str, Any]:
        async with openai.AsyncOpenAI(
            base_url=url + "/v1",
            api_key=token or "none",
            http_client=httpx.AsyncClient(verify=verify, timeout=600),
            max_retries=0,
        ) as client:
            return await measure_tool_calls(client, name, limit=args.limit, stride=args.stride)

    with tempfile.TemporaryDirectory() as tmp:
        worker = start_worker([args.model], Path(tmp))
        try:
            figures = asyncio.run(run(worker.url, worker.token, worker.ssl or False))
        finally:
            worker.stop()
    rate = figures["tool_call_valid_rate"]
    print(
        f"{figures['tool_calls']} tool calls, valid rate {rate}"
        f" ({'ok' if rate == TARGET_VALID_RATE else 'BELOW'} target {TARGET_VALID_RATE}); "
        f"right tool {figures['tool_call_right_rate']:.0%} (auto), "
        f"{figures['tool_call_right_rate_required']:.0%} (required); "
        f"device commands without a call: {figures['device_commands_without_call']}"
    )
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
