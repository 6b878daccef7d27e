"""``llmlb chat MODEL [PROMPT]``: talk to a model through the router, streaming.

With a prompt it prints the one answer as it is generated. Without one it holds a
conversation: each line read is a user turn, sent with the whole history so far (so the
node's prompt cache reuses the earlier turns); empty lines are skipped, and end of input
(Ctrl-D) or ``/exit`` ends it. ``--verbose`` prints one timing line
per answer on stderr: time to first token, tokens and their rate, prompt tokens and how many
of them the node had cached, and why the answer ended.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from llmlb import config
from llmlb.cli.api_client import ApiClientError, add_client_arguments, report_error

EXIT_COMMANDS = ("/exit", "/quit")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``chat``."""
    parser = subparsers.add_parser(
        "chat",
        help="stream a chat answer through the router, or hold a conversation",
        description="Stream the answer to PROMPT as it is generated. Without PROMPT, hold a "
        "conversation: each line you type is a turn, sent with the history so far; Ctrl-D or "
        "/exit ends it.",
    )
    parser.add_argument("model_id", metavar="MODEL_ID")
    parser.add_argument("prompt", nargs="?", help="one question (default: a conversation)")
    parser.add_argument("--max-tokens", type=int, default=256, help="per answer (default 256)")
    parser.add_argument("--system", help="a system message to start with")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="after each answer, a timing line on stderr: TTFT, tokens/s, cached prompt tokens",
    )
    add_client_arguments(
        parser,
        key_help="api key (default $LLMLB_ADMIN_KEY, else $LLMLB_HOME/api.key written by "
        "`llmlb up`)",
    )
    parser.set_defaults(func=chat)


@dataclass
class Answer:
    """One streamed answer: its text and what the stream said about it.

    Attributes:
        text: the content, all deltas joined.
        started: ``time.monotonic()`` when the request was sent.
        first_token_at: when the first content arrived (``None``: none did).
        ended_at: when the stream ended.
        finish_reason: the last choice's ``finish_reason``.
        usage: the final usage chunk (``stream_options.include_usage``), if any.
    """

    text: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    def timing_line(self) -> str:
        """``[ttft 0.12 s · 35 tokens in 0.41 s, 85 tok/s · prompt 57 tokens, 40 cached ·
        stop]``."""
        ended = self.ended_at or time.monotonic()
        parts = []
        if self.first_token_at is not None:
            parts.append(f"ttft {self.first_token_at - self.started:.2f} s")
        completion = self.usage.get("completion_tokens")
        if isinstance(completion, int):
            took = ended - (self.first_token_at or self.started)
            rate = f", {completion / took:.0f} tok/s" if took > 0 and completion > 1 else ""
            parts.append(f"{completion} tokens in {ended - self.started:.2f} s{rate}")
        prompt = self.usage.get("prompt_tokens")
        if isinstance(prompt, int):
            cached = (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            parts.append(f"prompt {prompt} tokens, {cached} cached")
        parts.append(self.finish_reason or "no finish_reason")
        return "[" + " · ".join(parts) + "]"


def chat(args: argparse.Namespace) -> int:
    """Run ``llmlb chat``: one answer, or a conversation when no prompt is given."""
    router = args.router or config.router_url()
    key = args.api_key or config.admin_key() or _saved_api_key()
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        return 0 if _turn(args, router, key, messages, sys.stdout) else 1
    return _conversation(args, router, key, messages)


def _conversation(
    args: argparse.Namespace, router: str, key: str | None, messages: list[dict[str, Any]]
) -> int:
    """Read turns until end of input; each answer joins the history."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"Chatting with {args.model_id} at {router}; Ctrl-D or /exit ends.",
            file=sys.stderr,
        )
    status = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return status
        text = line.strip()
        if text in EXIT_COMMANDS:
            return status
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = _turn(args, router, key, messages, sys.stdout)
        if answer is None:
            messages.pop()  # the turn failed: leave it out of the history
            status = 1
            continue
        messages.append({"role": "assistant", "content": answer.text})


def _turn(
    args: argparse.Namespace,
    router: str,
    key: str | None,
    messages: list[dict[str, Any]],
    out: TextIO,
) -> Answer | None:
    """Stream one answer to ``out``; ``None`` (and a line on stderr) when it failed."""
    body = {
        "model": args.model_id,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    answer = Answer()
    try:
        for event in stream_chat_events(router, key, body):
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if answer.first_token_at is None:
                        answer.first_token_at = time.monotonic()
                    answer.text += piece
                    out.write(piece)
                    out.flush()
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
            if event.get("usage"):
                answer.usage = event["usage"]
    except ApiClientError as exc:
        print(file=out)
        report_error(exc)
        return None
    answer.ended_at = time.monotonic()
    print(file=out, flush=True)
    if args.verbose:
        print(answer.timing_line(), file=sys.stderr, flush=True)
    return answer


def _saved_api_key() -> str | None:
    try:
        return (config.llmlb_home() / "api.key").read_text().strip() or None
    except OSError:
        return None


def stream_chat_events(
    router: str, api_key: str | None, body: dict[str, Any], timeout: float = 300.0
) -> Iterator[dict[str, Any]]:
    """POST a streaming chat completion; yield each chunk (a dict) as it arrives.

    Raises:
        ApiClientError: the router refused the request, could not be reached, or the stream
            carried an error.
    """
    url = urllib.parse.urlsplit(router)
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = url.path.rstrip("/") + "/v1/chat/completions"
    try:
        conn.request("POST", path, body=orjson.dumps(body), headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise _error_from(response.status, response.read())
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = orjson.loads(data)
            if "error" in event:
                raise _error_from(None, data)
            yield event
    except OSError as exc:
        raise ApiClientError(
            None, "unreachable", f"cannot reach the router at {router}: {exc}"
        ) from None
    finally:
        conn.close()


def stream_chat(
    router: str, api_key: str | None, body: dict[str, Any], timeout: float = 300.0
) -> Iterator[str]:
    """POST a streaming chat completion; yield the content of each delta.

    Raises:
        ApiClientError: as :func:`stream_chat_events`.
    """
    for event in stream_chat_events(router, api_key, body, timeout):
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text


def _error_from(status: int | None, raw: bytes) -> ApiClientError:
    try:
        error = orjson.loads(raw)["error"]
        return ApiClientError(status, str(error.get("code")), str(error.get("message")))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return ApiClientError(status, "http_error", raw.decode(errors="replace")[:200])
