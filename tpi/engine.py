"""The master's engine: embed, run the layers with the workers, norm + LM head, sample, stop.

Owns: request state on rank 0 (sequence ids, steps, prefill in chunks then decode with the KV
cache), stopping at EOS ids, stop strings and the token limit, incremental detokenisation for
streaming, and cancelling a sequence on every rank when something fails. The tokenizer is loaded
lazily, on first use of text. Does not know: sockets (it gets a Communicator), HTTP, processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tpi.comm.base import Communicator, ControlPlane
from tpi.comm.wire import Kind, Message
from tpi.errors import TpiError
from tpi.forward import logits, run_layers
from tpi.open_rank import open_rank_model
from tpi.options import RankOptions
from tpi.sampling import SamplingParams, sample
from tpi.stats import RankStats
from tpi.weights import Manifest

TokenCallback = Callable[[list[int], str], None]


class RequestError(TpiError, ValueError):
    """A request the engine cannot serve as given; the message names the value."""


@dataclass
class GenerationResult:
    ids: list[int]  # new tokens, the EOS id included when generation ended on it
    text: str  # decoded new text, cut before a stop string ("" without a tokenizer)
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    ttft_s: float  # request start to first token
    decode_s: float  # first token to last token


class Engine:
    """Rank 0's generation over `comm`, the master's end of the cluster (allreduce and control)."""

    def __init__(self, shard_dir: str | Path, manifest: Manifest, comm: Communicator | ControlPlane,
                 opts: RankOptions | None = None):
        self.shard_dir, self.manifest, self.comm = Path(shard_dir), manifest, comm
        self.cfg = manifest.config
        self._tokenizer = None
        if self._has_tokenizer():
            self._tokenizer = self._load_tokenizer()  # before the weights, so the memory budget counts it
        self.model = open_rank_model(shard_dir, manifest, 0, opts or RankOptions())
        gen_eos = manifest.raw.get("generation", {}).get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = set(self.cfg.eos_token_ids) | set(gen_eos)
        self._next_seq = 1

    @property
    def max_context(self) -> int:
        return self.model.max_context

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers, imported here only: the master's business)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.shard_dir))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    # -- steps ---------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int], extra: int) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise RequestError("input_ids is empty: expected at least one token id")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) + extra > self.max_context:
            raise RequestError(f"{len(ids)} prompt tokens + {extra} new tokens exceed the maximum context "
                               f"of {self.max_context} tokens")
        return ids

    def _run(self, seq: int, step: int, start: int, ids: list[int], every_row: bool = False) -> torch.Tensor:
        """One step for tokens `ids` at positions [start, start + len): float32 logits [1 or L, V].

        Every step ends with the LM head (the last row's unless `every_row`), so that the weight
        scheduler sees the same cycle of blocks each step."""
        t0 = time.perf_counter()
        try:
            x = self.model.embed(ids)  # [L, D]
            self.comm.broadcast(Message(Kind.STEP, seq, step, start=start, length=len(ids), tensor=x))
            h = run_layers(self.model, self.comm, x, seq, step, start)
            return logits(self.model, h if every_row else h[-1:])
        finally:
            self.model.busy_s += time.perf_counter() - t0
            self.model.steps += 1

    def stats(self) -> list[RankStats]:
        """One record per rank (master first): peak RSS, bytes read, stall, compute, allreduce."""
        return [self.local_stats(), *self.comm.gather_stats()]

    def local_stats(self) -> RankStats:
        """Rank 0's own record (no round trip to the workers)."""
        timing = self.comm.timing
        return self.model.stats(timing.seconds, timing.calls, self.comm.refused)

    def close(self) -> None:
        self.model.close()

    def _prefill(self, seq: int, ids: list[int], every_row: bool = False) -> tuple[torch.Tensor, int]:
        """Prefill in chunks of the model's prefill_chunk tokens; -> (logits, steps taken)."""
        out, chunk = [], self.model.prefill_chunk
        for step, start in enumerate(range(0, len(ids), chunk)):
            out.append(self._run(seq, step, start, ids[start:start + chunk], every_row))
        return (torch.cat(out) if every_row else out[-1]), len(out)

    def _new_seq(self) -> int:
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        return seq

    def _finish(self, seq: int, failed: bool) -> None:
        self.model.cache.free(seq)
        if failed:
            self.model.sched.reset()
        try:
            self.comm.broadcast(Message(Kind.CANCEL if failed else Kind.FREE, seq), check=not failed)
        except Exception:
            if not failed:
                raise

    @torch.inference_mode()
    def forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Prefill a fresh sequence; float32 logits [len(ids), V] for every position."""
        ids = self._check_ids(ids, 0)
        seq, failed = self._new_seq(), True
        try:
            logits, _ = self._prefill(seq, ids, every_row=True)
            failed = False
            return logits
        finally:
            self._finish(seq, failed)

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], max_new_tokens: int = 64, params: SamplingParams | None = None,
                 stop: Sequence[str] = (), on_token: TokenCallback | None = None,
                 ignore_eos: bool = False) -> GenerationResult:
        """Prefill `ids`, then decode until EOS (unless `ignore_eos`), a stop string or `max_new_tokens`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
        ids = self._check_ids(ids, max_new_tokens)
        params = params or SamplingParams()
        stop = [s for s in stop if s]
        tokenizer = self.tokenizer if self._has_tokenizer() else None
        # text as it comes only when someone needs it: stop strings or a streaming caller
        texts = _TextStream(tokenizer if (stop or on_token) else None, stop)
        gen = params.generator()
        seq, failed, t0 = self._new_seq(), True, time.perf_counter()
        new: list[int] = []
        finish, first_at = "length", t0
        try:
            logits, step = self._prefill(seq, ids)
            pos = len(ids)
            while True:
                token = sample(logits[0], params, gen)
                new.append(token)
                if len(new) == 1:
                    first_at = time.perf_counter()
                delta, stopped = texts.push(new)
                if on_token:
                    on_token([token], delta)
                if (token in self.eos_ids and not ignore_eos) or stopped:
                    finish = "stop"
                    break
                if len(new) >= max_new_tokens:
                    break
                logits = self._run(seq, step, pos, [token])
                step, pos = step + 1, pos + 1
            tail = texts.flush()
            if on_token and tail:
                on_token([], tail)
            failed = False
        finally:
            self._finish(seq, failed)
        end = time.perf_counter()
        text = texts.text if texts.tokenizer or tokenizer is None else tokenizer.decode(new, skip_special_tokens=True)
        return GenerationResult(new, text, finish, len(ids), first_at - t0, end - first_at)

    def _has_tokenizer(self) -> bool:
        return self._tokenizer is not None or any(
            (self.shard_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


class _TextStream:
    """Incremental detokenisation: text deltas that never split a character or a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text, self.sent = "", 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """All new ids so far -> (text to emit now, whether a stop string appeared)."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s, max(0, self.sent - len(s)))
            if cut >= 0:
                self.text = text[:cut]
                return self._emit(len(self.text)), True
        self.text = text
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = min(safe, len(text.rstrip("\ufffd")))
        return self._emit(max(safe, self.sent)), False

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return delta

    def flush(self) -> str:
        return self._emit(len(self.text))
