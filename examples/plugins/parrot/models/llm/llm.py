"""An LLM that streams the last user message back, one word per chunk, with a pause before each.

- ``model_parameters.delay_ms`` (default 50) is the pause, so a client can see the stream arrive.
- A word ``ratelimit`` in the message makes it raise ``InvokeRateLimitError`` when it gets there,
  after the words before it were streamed (how a provider error looks mid-stream).
- ``stop`` words end the reply early; ``max_tokens`` caps the number of words.
"""

import time
from collections.abc import Generator

from dify_plugin import LargeLanguageModel
from dify_plugin.entities.model.llm import LLMResult, LLMResultChunk, LLMResultChunkDelta
from dify_plugin.entities.model.message import (
    AssistantPromptMessage,
    PromptMessage,
    PromptMessageTool,
    UserPromptMessage,
)
from dify_plugin.errors.model import InvokeRateLimitError
from provider.parrot import ERROR_MAPPING, check_credentials


def _text(message: PromptMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(getattr(part, "data", "") for part in content if part.type == "text")


def _last_user_text(prompt_messages: list[PromptMessage]) -> str:
    for message in reversed(prompt_messages):
        if isinstance(message, UserPromptMessage):
            return _text(message)
    return _text(prompt_messages[-1]) if prompt_messages else ""


def _count_tokens(prompt_messages: list[PromptMessage]) -> int:
    return sum(len(_text(message).split()) for message in prompt_messages)


class ParrotLargeLanguageModel(LargeLanguageModel):
    def _invoke(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        model_parameters: dict,
        tools: list[PromptMessageTool] | None = None,
        stop: list[str] | None = None,
        stream: bool = True,
        user: str | None = None,
    ) -> LLMResult | Generator[LLMResultChunk, None, None]:
        words = _last_user_text(prompt_messages).split()
        for index, word in enumerate(words):
            if stop and word in stop:
                words = words[:index]
                break
        words = words[: int(model_parameters.get("max_tokens") or len(words) or 1)]
        delay = float(model_parameters.get("delay_ms", 50)) / 1000
        prompt_tokens = _count_tokens(prompt_messages)
        if not stream:
            if "ratelimit" in words:
                raise InvokeRateLimitError("the parrot is out of breath (ratelimit)")
            time.sleep(delay * len(words))
            return LLMResult(
                model=model,
                prompt_messages=[],
                message=AssistantPromptMessage(content=" ".join(words)),
                usage=self._calc_response_usage(model, credentials, prompt_tokens, len(words)),
            )
        return self._stream(model, credentials, words, delay, prompt_tokens)

    def _stream(
        self, model: str, credentials: dict, words: list[str], delay: float, prompt_tokens: int
    ) -> Generator[LLMResultChunk, None, None]:
        for index, word in enumerate(words):
            time.sleep(delay)
            if word == "ratelimit":
                raise InvokeRateLimitError("the parrot is out of breath (ratelimit)")
            yield LLMResultChunk(
                model=model,
                prompt_messages=[],
                delta=LLMResultChunkDelta(
                    index=index,
                    message=AssistantPromptMessage(content=word if index == 0 else " " + word),
                ),
            )
        yield LLMResultChunk(
            model=model,
            prompt_messages=[],
            delta=LLMResultChunkDelta(
                index=len(words),
                message=AssistantPromptMessage(content=""),
                usage=self._calc_response_usage(model, credentials, prompt_tokens, len(words)),
                finish_reason="stop",
            ),
        )

    def get_num_tokens(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        tools: list[PromptMessageTool] | None = None,
    ) -> int:
        """One token per whitespace-separated word."""
        return _count_tokens(prompt_messages)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
