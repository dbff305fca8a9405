"""Teach the tiny random model three answers, in about a minute on two CPU cores.

Greedy decoding then answers the last turn of a chat, whatever system prompt,
tool list and earlier turns precede it:

* user "turn on the kitchen light" -> TOOL_CALL (a Hermes-style <tool_call>), typed or
  as speech-to-text writes it ("Turn on the kitchen light.", teach_data.TURN_ON_FORMS);
* a tool response                   -> "The kitchen light is on.";
* user "hello"                      -> "Hello from Hearth!".

Conversations are rendered with the model's own chat template, with random system
prompts (Home Assistant-like and random text), random tool lists (JSON rendered with
either Hugging Face's or Jinja's tojson), and random earlier turns; half of them laid
out as Hearth sends them (a note with the time before every user turn). The loss is on the
fixed answers only, wherever they occur in a conversation.

After the planned steps it checks held-out conversations (some shaped like Home
Assistant's real prompt) by the *margin* of every answer token: the logit of the
expected token minus the largest other logit, with the answer fed in (teacher forcing).
An answer decodes exactly under greedy decoding when all its margins are positive; a
margin of several logits also survives the rounding differences between CPUs (AVX2,
AVX-512, NEON), thread counts and runtimes (torch here, onnxruntime in the worker),
which are some 1e-4 on this model. It trains on at the final learning rate until every
held-out answer is exact with at least MARGIN_GOAL, up to MAX_STEPS, and reports what it
reached (``teach()`` returns the numbers; make_test_model writes them to
teach-report.json). The result depends on the CPU's floating-point details, so the
demo model the tests and scripts/develop use is built once and checked in
(scripts/demo_model, see its README.md); tests/export/test_taught_model.py checks that
this recipe still teaches within a tolerance.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from teach_data import ANSWERS, Sampler, held_out
from tokenizers import Tokenizer

SEED = 4321
STEPS = 600  # the learning-rate schedule's length; ~75 s on two idle cores
MAX_STEPS = 2400  # at most, while the held-out check fails after STEPS
CHECK_EVERY = 100  # after STEPS
MARGIN_GOAL = 3.0  # logits: the smallest margin of any held-out answer token
CHECK_SETS = 4  # held_out() sets of 15 conversations checked
BATCH_TOKENS = 3072
MAX_LEN = 3072
LR = 6e-3
WARMUP = 20

Example = tuple[list[int], list[int]]


def encode_example(sampler: Sampler, tokenizer: Tokenizer, rng: random.Random) -> Example | None:
    """Token ids and a 0/1 loss mask (1 on the fixed answers and their <|im_end|>)."""
    messages, tools = sampler.conversation()
    env = rng.choice(sampler.envs)  # one tojson style for the whole conversation
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("content") not in ANSWERS:
            continue
        prefix = str(env.render(messages=messages[:i], tools=tools, add_generation_prompt=True))
        if not prefix.startswith(done):
            raise RuntimeError("teach: the chat template does not render turns incrementally")
        piece = tokenizer.encode(prefix[len(done) :], add_special_tokens=False).ids
        answer = tokenizer.encode(message["content"] + "<|im_end|>", add_special_tokens=False).ids
        ids += piece + answer
        mask += [0] * len(piece) + [1] * len(answer)
        done = prefix + message["content"] + "<|im_end|>"
    if len(ids) > MAX_LEN:
        return None
    return ids, mask


def batches(sampler: Sampler, tokenizer: Tokenizer, rng: random.Random) -> Iterator[list[Example]]:
    """Endless batches of similar-length examples, at most BATCH_TOKENS padded tokens each."""
    while True:
        pool = [e for e in (encode_example(sampler, tokenizer, rng) for _ in range(64)) if e]
        pool.sort(key=lambda e: len(e[0]))
        out: list[list[Example]] = []
        batch: list[Example] = []
        for example in pool:  # sorted: the newest example is the widest
            if batch and len(example[0]) * (len(batch) + 1) > BATCH_TOKENS:
                out.append(batch)
                batch = []
            batch.append(example)
        out.append(batch)
        rng.shuffle(out)
        yield from out


def answer_margins(model: Any, prompt: list[int], answer: list[int]) -> list[float]:
    """Per answer token: its logit minus the largest other logit, the answer fed in.

    Greedy decoding reproduces ``answer`` exactly when every margin is positive."""
    with torch.no_grad():
        ids = torch.tensor([prompt + answer])
        hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
        logits = model.lm_head(hidden).float()
    rows = torch.arange(len(answer))
    target = torch.tensor(answer)
    right = logits[rows, target]
    logits[rows, target] = -math.inf
    return [float(m) for m in right - logits.max(dim=1).values]


@dataclass
class Report:
    """What teaching reached on the held-out conversations."""

    steps: int
    exact: int  # held-out answers that greedy decoding reproduces
    checks: int
    min_margin: float  # over every answer token of every held-out answer
    seconds: float

    @property
    def taught(self) -> bool:
        return self.exact == self.checks and self.min_margin >= MARGIN_GOAL


def teach(
    model: Any, hf_dir: Path, log: Callable[[str], None], max_steps: int = MAX_STEPS
) -> Report:
    """Train ``model`` in place; stops once taught (see Report.taught) or at max_steps."""
    started = time.monotonic()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    sampler = Sampler(template, rng)
    pad = int(tokenizer.token_to_id("<|endoftext|>"))

    check_sampler = Sampler(template, random.Random(SEED + 1))
    checks = [
        (
            tokenizer.encode(prompt, add_special_tokens=False).ids,
            tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False).ids,
        )
        for _ in range(CHECK_SETS)
        for prompt, answer in held_out(check_sampler)
    ]
    log(
        f"teaching: {STEPS} steps, then until every held-out answer is exact with a margin "
        f"of {MARGIN_GOAL} (at most {max_steps} steps); {len(checks)} held-out prompts, "
        f"the longest {max(len(p) for p, _ in checks)} tokens"
    )

    def check(step: int) -> Report:
        model.eval()
        worst = [min(answer_margins(model, p, a)) for p, a in checks]
        model.train()
        return Report(
            steps=step,
            exact=sum(m > 0 for m in worst),
            checks=len(checks),
            min_margin=round(min(worst), 3),
            seconds=round(time.monotonic() - started, 1),
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = min(1.0, step / STEPS)
        return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    model.train()
    stream = batches(sampler, tokenizer, rng)
    running = 0.0
    report: Report | None = None
    for step in range(1, max_steps + 1):
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
        predict = target[:, 1:]  # position t predicts token t+1: score the answers only
        logits = model.lm_head(hidden[:, :-1][predict])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][predict])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        if step >= STEPS and ((step - STEPS) % CHECK_EVERY == 0 or step == max_steps):
            report = check(step)
            log(
                f"teaching: step {step}, loss {running:.4f}, {report.exact}/{report.checks} "
                f"exact, smallest margin {report.min_margin:.2f}, {report.seconds:.0f}s"
            )
            if report.taught:
                break
        elif step % 100 == 0:
            log(f"teaching: step {step}, loss {running:.4f}, {time.monotonic() - started:.0f}s")
    model.eval()
    if report is None:  # max_steps < STEPS
        report = check(max_steps)
    log(
        ("taught" if report.taught else "not fully taught")
        + f" in {report.steps} steps, {report.seconds:.0f}s"
    )
    return report
