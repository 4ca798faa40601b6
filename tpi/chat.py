"""`tpi chat`: an interactive terminal client for any OpenAI-compatible server.

Owns: the conversation (it keeps every turn), streaming the answer as it arrives (server-sent
events), and clear messages for connection and HTTP errors. Does not know: tpi's internals; it
speaks only HTTP.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import httpx

from tpi.errors import TpiError


class ChatError(TpiError, RuntimeError):
    pass


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        resp.read()
        try:
            msg = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = resp.text[:200]
        raise ChatError(f"HTTP {resp.status_code}: {msg}")


def first_model(client: httpx.Client, url: str) -> str:
    resp = client.get(f"{url}/models")
    _check(resp)
    return resp.json()["data"][0]["id"]


def stream_reply(client: httpx.Client, url: str, body: dict) -> Iterator[str]:
    """Text deltas of one streamed chat completion."""
    with client.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as resp:
        _check(resp)
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ChatError(chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


def chat(url: str, model: str | None, api_key: str | None, system: str | None, temperature: float,
         max_tokens: int, inp=input, out=sys.stdout) -> None:
    url = url.rstrip("/")
    messages = [{"role": "system", "content": system}] if system else []
    with httpx.Client(headers=_headers(api_key), timeout=httpx.Timeout(10.0, read=300.0)) as client:
        try:
            model = model or first_model(client, url)
        except httpx.HTTPError as e:
            raise ChatError(f"cannot reach {url}: {e}") from None
        print(f"chatting with {model} at {url} (Ctrl-D to quit)", file=out)
        while True:
            try:
                text = inp("you> ")
            except EOFError:
                print(file=out)
                return
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
            print("assistant> ", end="", file=out, flush=True)
            answer = []
            try:
                for delta in stream_reply(client, url, body):
                    answer.append(delta)
                    print(delta, end="", file=out, flush=True)
            except (ChatError, httpx.HTTPError) as e:
                messages.pop()
                print(f"\n[error: {e}]", file=out)
                continue
            print(file=out)
            messages.append({"role": "assistant", "content": "".join(answer)})
