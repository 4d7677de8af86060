"""Streamed generation with honest counts and speeds, for the CLI and the demo."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass
class Generated:
    """One streamed generation; timings from llama.cpp's perf counters, ``seconds`` wall-clock."""

    text: str
    tokens: int            # tokens generated (an end-of-text token not counted)
    seconds: float         # wall-clock, prompt included
    prompt_tokens: int
    prompt_seconds: float
    decoded: int           # generated tokens fed back one at a time (all but a last sampled one)
    decode_seconds: float

    @property
    def tok_per_s(self) -> float:
        """Generation speed: tokens decoded after the prompt per second of decoding."""
        if self.decoded and self.decode_seconds > 0:
            return self.decoded / self.decode_seconds
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        prompt = (f", prompt {self.prompt_tokens} tokens at {self.prompt_tokens / self.prompt_seconds:.1f} tok/s"
                  if self.prompt_seconds > 0 else "")
        return f"{self.tokens} tokens in {self.seconds:.2f} s, {self.tok_per_s:.1f} tok/s{prompt}"


def generate_text(llm: Any, prompt: str, *, n_predict: int, temperature: float, chat: bool,
              write: Callable[[str], None]) -> Generated:
    """Stream a completion (or a chat reply) through ``write``; count tokens with llama.cpp's timers."""
    import llama_cpp

    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    start = time.perf_counter()
    pieces: list[str] = []
    finish = None
    if chat:
        stream: Iterable[Any] = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=n_predict,
            temperature=temperature, stream=True)
    else:
        stream = llm(prompt, max_tokens=n_predict, temperature=temperature, stream=True)
    for chunk in stream:
        choice = chunk["choices"][0]
        text = choice["delta"].get("content") if chat else choice.get("text")
        if text:
            pieces.append(text)
            write(text)
        finish = choice.get("finish_reason") or finish
    seconds = time.perf_counter() - start
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    # Generated tokens are decoded one at a time, except the last one when the run stops at
    # max_tokens; an end-of-text token is sampled but neither decoded nor returned.  A one-token
    # prompt is decoded alone too.  llama_perf_context reports max(1, count) for both counters, so
    # they cannot say 0: count from the positions the context holds (the model was loaded for this
    # run, so all of them were decoded now) and from the prompt batches, which hold 2+ tokens.
    batched = perf.n_p_eval if perf.n_p_eval > 1 else 0
    single = llm.n_tokens - batched          # tokens decoded one at a time
    one_token_prompt = batched == 0 and single > 0
    decoded = single - one_token_prompt
    tokens = decoded + (finish == "length")
    return Generated("".join(pieces), tokens, seconds, batched + one_token_prompt,
                      perf.t_p_eval_ms / 1000, decoded, perf.t_eval_ms / 1000)
