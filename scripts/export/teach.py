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
conversations (some shaped like Home Assistant's real prompt) decode exactly after the
planned steps; otherwise it trains on at the final learning rate, up to a cap.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from teach_data import ANSWERS, Sampler, held_out
from tokenizers import Tokenizer

SEED = 4321
STEPS = 600  # the learning-rate schedule's length; ~75 s on two idle cores
EXTRA_STEPS = 200  # at most, if the held-out check fails after STEPS
CHECK_EVERY = 50  # during the extra steps
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


def teach(model: Any, hf_dir: Path, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    sampler = Sampler(template, rng)
    eos = {int(tokenizer.token_to_id("<|im_end|>")), int(tokenizer.token_to_id("<|endoftext|>"))}
    pad = int(tokenizer.token_to_id("<|endoftext|>"))

    check_sampler = Sampler(template, random.Random(SEED + 1))
    checks = [
        (
            tokenizer.encode(prompt, add_special_tokens=False).ids,
            tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False).ids,
        )
        for prompt, answer in held_out(check_sampler) + held_out(check_sampler)
    ]
    log(
        f"teaching: {STEPS} steps; {len(checks)} held-out prompts, "
        f"the longest {max(len(p) for p, _ in checks)} tokens"
    )

    def check() -> int:
        model.eval()
        right = sum(greedy(model, p, len(a) + 4, eos) == a for p, a in checks)
        model.train()
        return right

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = min(1.0, step / STEPS)
        return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    model.train()
    stream = batches(sampler, tokenizer, rng)
    running = 0.0
    for step in range(1, STEPS + EXTRA_STEPS + 1):
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
        elapsed = time.monotonic() - started
        if step >= STEPS and (step - STEPS) % CHECK_EVERY == 0:
            right = check()
            log(f"teaching: step {step}, loss {running:.4f}, {right}/{len(checks)} exact")
            if right == len(checks):
                model.eval()
                log(f"taught in {step} steps, {time.monotonic() - started:.0f}s")
                return
        elif step % 100 == 0:
            log(f"teaching: step {step}, loss {running:.4f}, {elapsed:.0f}s")
    raise SystemExit(
        f"teach: after {STEPS + EXTRA_STEPS} steps the model still misses held-out answers"
    )
