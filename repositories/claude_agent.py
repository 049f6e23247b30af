"""Claude through the Claude Agent SDK: one single-turn, tool-less Claude Code CLI run per completion."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    CLIJSONDecodeError,
    CLINotFoundError,
    Message,
    ProcessError,
    ResultError,
    ResultMessage,
    StreamEvent,
    TextBlock,
)
from claude_agent_sdk.types import SystemPromptFile

from repositories.chat import ChatMessage, ChatRequest, Finished, TextDelta, Usage
from repositories.chat import StreamEvent as ChatStreamEvent
from repositories.errors import (
    AttemptTimedOut,
    ProviderError,
    Rejected,
    StreamBroken,
    Unavailable,
    error_for_status,
)
from repositories.redaction import redact, register_secret

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Output-token cap sent when the request sets no ``max_tokens`` (the CLI's own default is 32000).
DEFAULT_MAX_TOKENS = 4096
#: How the CLI words a turn cut short by ``CLAUDE_CODE_MAX_OUTPUT_TOKENS``.
_OUTPUT_CAP_ERROR = re.compile(r"response exceeded the \d+ output token maximum")
#: ``AssistantMessage.error`` values that mean the request itself was refused, when no HTTP status came with them.
REJECTED_ASSISTANT_ERRORS = frozenset({"authentication_failed", "billing_error", "invalid_request"})


def render_prompt(messages: Sequence[ChatMessage]) -> str:
    """Render the user and assistant messages as the one prompt the CLI takes (system messages are excluded).

    A conversation of a single user message is sent verbatim. A longer one becomes a transcript: an
    instruction line, then ``<conversation>`` holding one ``<message role="user|assistant">`` element per
    message, oldest first; the model is asked for the assistant's next reply, or to continue the assistant's
    message when the conversation ends with one.
    """
    turns = [message for message in messages if message.role != "system"]
    if len(turns) == 1 and turns[0].role == "user":
        return turns[0].content
    if turns and turns[-1].role == "assistant":
        instruction = (
            "Below is a conversation, oldest message first. Continue the assistant's last message: "
            "write only the text that comes next in it."
        )
    else:
        instruction = "Below is a conversation, oldest message first. Write only the assistant's next reply."
    body = "\n".join(f'<message role="{turn.role}">\n{turn.content}\n</message>' for turn in turns)
    return f"{instruction}\n\n<conversation>\n{body}\n</conversation>"


def usage_of(raw: dict[str, Any] | None) -> Usage | None:
    """Map the CLI's ``usage`` dict to ``Usage``; prompt tokens include cache reads and writes."""
    if not raw:
        return None

    def count(name: str) -> int:
        value = raw.get(name)
        return int(value) if isinstance(value, int | float) else 0

    prompt = count("input_tokens") + count("cache_creation_input_tokens") + count("cache_read_input_tokens")
    return Usage(prompt_tokens=prompt, completion_tokens=count("output_tokens"))


@dataclass
class _Turn:
    """What one CLI turn has told us so far: turns SDK messages into text deltas and the final outcome."""

    model: str
    streamed_message_ids: set[str] = field(default_factory=set)
    current_message_id: str | None = None
    assistant_error: str | None = None
    result: ResultMessage | None = None

    def texts(self, message: Message) -> list[str]:
        """The new text pieces ``message`` carries (partial stream events first, whole messages as fallback)."""
        if isinstance(message, StreamEvent):
            return self._stream_event_texts(message) if message.parent_tool_use_id is None else []
        if isinstance(message, AssistantMessage):
            if message.parent_tool_use_id is not None:
                return []
            if message.error is not None:
                # A synthetic message whose text is the CLI's own error prose, not model output.
                self.assistant_error = str(message.error)
                return []
            self.model = message.model or self.model
            if message.message_id is not None and message.message_id in self.streamed_message_ids:
                return []
            return [block.text for block in message.content if isinstance(block, TextBlock) and block.text]
        if isinstance(message, ResultMessage):
            self.result = message
        return []

    def _stream_event_texts(self, message: StreamEvent) -> list[str]:
        event = message.event
        if event.get("type") == "message_start":
            start = event.get("message") or {}
            self.current_message_id = start.get("id")
            self.model = start.get("model") or self.model
            return []
        delta = event.get("delta") or {}
        if event.get("type") == "content_block_delta" and delta.get("type") == "text_delta" and delta.get("text"):
            if self.current_message_id is not None:
                self.streamed_message_ids.add(self.current_message_id)
            return [str(delta["text"])]
        return []


class ClaudeAgentProvider:
    """Runs each completion as one single-turn Claude Code CLI session (no tools, no settings, no session file).

    The CLI runs in a fresh temporary HOME and CLAUDE_CONFIG_DIR that are removed afterwards, with its
    non-streaming fallback switched off, and its own retries too unless ``cli_max_retries`` allows some.
    Sampling options (temperature, top_p, stop, penalties) are dropped: the CLI has no such settings;
    ``max_tokens`` becomes ``CLAUDE_CODE_MAX_OUTPUT_TOKENS``.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        wall_clock_limit_s: float = 900.0,
        interrupt_timeout_s: float = 2.0,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        cli_path: str | None = None,
        name: str = "claude-agent-sdk",
        cli_max_retries: int = 0,
    ) -> None:
        """Keep the settings; ``base_url`` None keeps the CLI's default endpoint, ``cli_path`` None the bundled CLI."""
        self._api_key = api_key
        register_secret(api_key)
        self._base_url = base_url
        self._wall_clock_limit_s = wall_clock_limit_s
        self._interrupt_timeout_s = interrupt_timeout_s
        self._default_max_tokens = default_max_tokens
        self._cli_path = cli_path
        self._name = name
        self._cli_max_retries = cli_max_retries

    @property
    def name(self) -> str:
        """The provider name stored in job responses."""
        return self._name

    def _options(self, request: ChatRequest, workdir: Path) -> ClaudeAgentOptions:
        """CLI options for one isolated, single-turn, tool-less run inside ``workdir``."""
        env = {
            "ANTHROPIC_API_KEY": self._api_key,
            "HOME": str(workdir),
            "CLAUDE_CONFIG_DIR": str(workdir / ".claude"),
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": str(self._cli_max_retries),
            "CLAUDE_CODE_DISABLE_NONSTREAMING_FALLBACK": "1",
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(request.max_tokens or self._default_max_tokens),
        }
        if self._base_url:
            env["ANTHROPIC_BASE_URL"] = self._base_url
        system = "\n\n".join(message.content for message in request.messages if message.role == "system")
        system_prompt: SystemPromptFile | None = None
        if system:
            # A file rather than an argument: argv is readable by other local users and capped at 128 KiB.
            path = workdir / "system-prompt.txt"
            path.write_text(system, encoding="utf-8")
            system_prompt = SystemPromptFile(type="file", path=str(path))
        return ClaudeAgentOptions(
            tools=[],
            setting_sources=[],
            strict_mcp_config=True,
            max_turns=1,
            system_prompt=system_prompt,
            model=request.model,
            permission_mode="default",
            extra_args={"no-session-persistence": None},
            env=env,
            cwd=str(workdir),
            cli_path=self._cli_path,
            include_partial_messages=True,
            # The prompt is assembled from user content: never let "@/path" in it make the CLI read a local file.
            verbatim_prompts=True,
            thinking={"type": "disabled"},
            stderr=_log_cli_stderr,
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatStreamEvent]:
        """Yield text deltas as the CLI streams them, then one ``Finished`` with usage and the CLI's cost in USD.

        Raises ``error_for_status`` of the CLI's ``api_error_status`` when the API call failed (``Rejected``
        for 4xx, else retryable), ``Rejected`` for an authentication, billing or invalid-request error without
        a status, ``StreamBroken`` for any other failed turn or a CLI that crashed or spoke garbage,
        ``Unavailable`` when the CLI could not be started, ``ProviderError`` when no CLI is installed, and
        ``AttemptTimedOut`` past ``wall_clock_limit_s``. Cancelling the consuming task interrupts the turn
        and reaps the CLI process before the cancellation propagates.
        """
        workdir = Path(tempfile.mkdtemp(prefix="claude-agent-"))
        deadline = asyncio.get_running_loop().time() + self._wall_clock_limit_s
        client = ClaudeSDKClient(options=self._options(request, workdir))
        turn = _Turn(model=request.model)
        try:
            await self._before(deadline, self._start(client, render_prompt(request.messages)))
            messages = cast(AsyncGenerator[Message, None], client.receive_response())
            try:
                while turn.result is None:
                    try:
                        message = await self._before(deadline, anext(messages))
                    except StopAsyncIteration:
                        break
                    for text in turn.texts(message):
                        yield TextDelta(text)
            finally:
                await messages.aclose()
        except ResultError as exc:
            raise self._failure(exc.api_error_status, exc.result or "; ".join(exc.errors), turn) from None
        except CLINotFoundError:
            raise ProviderError("the Claude Code CLI is not installed", provider=self._name) from None
        except ProcessError as exc:
            raise StreamBroken(f"the Claude Code CLI exited with code {exc.exit_code}", provider=self._name) from None
        except CLIJSONDecodeError:
            raise StreamBroken("the Claude Code CLI wrote a line that is not JSON", provider=self._name) from None
        except CLIConnectionError as exc:
            raise Unavailable(
                f"could not run the Claude Code CLI ({type(exc).__name__})", provider=self._name
            ) from None
        except ClaudeSDKError as exc:
            raise StreamBroken(f"Claude Agent SDK failure ({type(exc).__name__})", provider=self._name) from None
        finally:
            await self._shut_down(client, interrupt=turn.result is None)
            shutil.rmtree(workdir, ignore_errors=True)
        result = turn.result
        if result is None:
            raise StreamBroken("the Claude Code CLI ended without a result", provider=self._name)
        if result.is_error and not _hit_output_cap(result):
            raise self._failure(result.api_error_status, result.result or "; ".join(result.errors or ()), turn)
        yield Finished(
            model=turn.model,
            finish_reason="max_tokens" if _hit_output_cap(result) else result.stop_reason,
            usage=usage_of(result.usage),
            cost=result.total_cost_usd,
        )

    async def _start(self, client: ClaudeSDKClient, prompt: str) -> None:
        """Start the CLI and send the prompt as the turn's one user message."""
        await client.connect()
        await client.query(prompt)

    async def _before(self, deadline: float, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` but give up at ``deadline`` (event-loop time) with ``AttemptTimedOut``."""
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                return await awaitable
        except TimeoutError:
            if timeout.expired():
                raise AttemptTimedOut(
                    f"attempt exceeded the {self._wall_clock_limit_s:.0f}s wall-clock limit", provider=self._name
                ) from None
            raise

    async def _shut_down(self, client: ClaudeSDKClient, *, interrupt: bool) -> None:
        """Stop an unfinished turn, then close the CLI's stdin and wait for it to exit (SIGTERM/SIGKILL if needed).

        Interrupting first matters: without it the CLI keeps its HTTP stream open for its 5 s exit grace period.
        """
        if interrupt:
            try:
                await asyncio.wait_for(client.interrupt(), self._interrupt_timeout_s)
            except Exception as exc:  # not connected, already gone, or not answering in time
                logger.debug("interrupting the Claude Code CLI failed: %r", exc, extra={"provider": self._name})
        await client.disconnect()

    def _failure(self, status: int | None, text: str, turn: _Turn) -> ProviderError:
        """Classify a failed turn: by the API's HTTP status when the CLI reports one, else by its error kind."""
        # ProviderError masks the key (repositories.redaction); masking first keeps a cut key from surviving.
        message = redact(text.strip())[:1000] or "the Claude Code CLI reported an error"
        if status is not None:
            return error_for_status(status, message, provider=self._name)
        if turn.assistant_error in REJECTED_ASSISTANT_ERRORS:
            return Rejected(message, provider=self._name)
        return StreamBroken(message, provider=self._name)


def _hit_output_cap(result: ResultMessage) -> bool:
    """True when the turn ended only because the answer reached ``max_tokens``.

    The CLI reports that as an error ("Claude's response exceeded the N output token maximum"), but the
    text streamed so far is the answer cut at the cap, as ``finish_reason="length"`` is on the other providers.
    """
    if not result.is_error:
        return False
    return result.stop_reason == "max_tokens" or bool(_OUTPUT_CAP_ERROR.search(result.result or ""))


def _log_cli_stderr(line: str) -> None:
    """Pass the CLI's stderr to the debug log (it never holds the key; prompts are not written there)."""
    if line.strip():
        logger.debug("claude cli: %s", line.rstrip())
