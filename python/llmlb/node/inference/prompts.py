"""Prompts and their validation against the model, in one place.

A :class:`ModelPrompts` is made once per loaded model (its chat template, special tokens,
context length, slots) and turns a typed request into what the scheduler runs: token
prompts, the answer's token budget, the sampler with its grammar, the stop strings, how tool
calls are recognised. Every check that needs the model happens here, in this order: the chat
template, the rendered prompt, the tool schemas (grammar budget and compilation), ``n``
against the slots, the context length, the response format's grammar, ``logit_bias`` against
the vocabulary. Errors name the fields as the client sent them (the request's
:class:`~llmlb.node.inference.contract.FieldPaths`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmlb.errors import ApiError, ContextLengthExceeded
from llmlb.node.inference import model_defaults, tool_calls
from llmlb.node.inference.chat_format import render_chat
from llmlb.node.inference.contract import ChatRequest, CompletionRequest, Generation
from llmlb.node.inference.generation import Tooling
from llmlb.node.inference.grammar_budget import GrammarBudgetExceeded, check_schema
from llmlb.node.inference.grammar_compiler import GrammarCompiler, GrammarRefused
from llmlb.node.inference.llama_native import Model
from llmlb.node.inference.sampling import SamplingParams
from llmlb.node.inference.templates import CHAT_TEMPLATE_FILENAME, turn_stop_strings


def bad(param: str, message: str) -> ApiError:
    """A 400 ``invalid_request_error`` for the request field ``param``."""
    return ApiError(400, "invalid_request_error", message, param=param)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request checked against the model, ready for the scheduler.

    Attributes:
        prompts: one token list per prompt.
        max_tokens: tokens per choice.
        sampling: the sampler, with the request's grammar.
        stop: stop strings (the request's and the template's end of turn).
        tooling: how calls are told apart from text (``None``: no tools).
        echo: the prompts' texts to put before each choice (completions ``echo``).
        chat: a chat request (else a completion).
    """

    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    tooling: Tooling | None = None
    echo: list[str] | None = None
    chat: bool = True


class ModelPrompts:
    """What one loaded model accepts, and typed requests turned into its prompts.

    Args:
        model_id: for messages.
        model: the loaded model (tokenizer, vocabulary, special tokens).
        template: its chat template (``None``: chat requests are 400).
        n_ctx_seq: the context of one slot, in tokens.
        slots: sequences per context (the most choices one request may ask for).
        grammars: the isolated grammar compiler.
        default_max_tokens: the answer's length when a request names none.
        model_dir: the model's directory in the store (its sampling defaults,
            :mod:`llmlb.node.inference.model_defaults`).
    """

    def __init__(
        self,
        model_id: str,
        model: Model,
        template: str | None,
        n_ctx_seq: int,
        slots: int,
        grammars: GrammarCompiler,
        default_max_tokens: int,
        model_dir: str,
    ):
        self.model_id = model_id
        self.model = model
        self.template = template
        self.n_ctx_seq = n_ctx_seq
        self.slots = slots
        self.grammars = grammars
        self.default_max_tokens = default_max_tokens
        self.model_dir = model_dir
        bos, eos = model.token("bos"), model.token("eos")
        self.bos = model.piece(bos, special=True).decode(errors="replace") if bos >= 0 else ""
        self.eos = model.piece(eos, special=True).decode(errors="replace") if eos >= 0 else ""
        self.turn_stops = turn_stop_strings(template)
        self.turn_stop_tokens = self._single_tokens(self.turn_stops)
        self.marker_tokens = self._single_tokens(tool_calls.markers(tool_calls.family(template)))

    def _single_tokens(self, texts: Any) -> frozenset[int]:
        """The ids of those ``texts`` that are one (special) token each."""
        out = set()
        for text in texts:
            ids = self.model.tokenize(text, add_special=False, parse_special=True)
            if len(ids) == 1:
                out.add(ids[0])
        return frozenset(out)

    # -- chat --------------------------------------------------------------------------

    def chat_tokens(self, request: ChatRequest) -> list[int]:
        """The prompt tokens of a chat request (messages, tools, template).

        Raises:
            ApiError: 400 ``chat_template_missing``, or an empty prompt.
        """
        if not self.template:
            raise ApiError(
                400,
                "chat_template_missing",
                f"model {self.model_id!r} has no chat template (none in the GGUF, no "
                f"{CHAT_TEMPLATE_FILENAME}, none in the manifest); use /v1/completions",
            )
        messages, tools = self._tool_messages(request)
        text = render_chat(
            self.template, messages, bos_token=self.bos, eos_token=self.eos, tools=tools
        )
        model = self.model
        tokens = model.tokenize(text, add_special=False, parse_special=True)
        bos = model.token("bos")
        if model.add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        if not tokens:
            raise bad(request.paths.messages, "the messages render to an empty prompt")
        return tokens

    def _tool_messages(
        self, request: ChatRequest
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and tools to render: a template that knows tools gets them as
        Hugging Face passes them; any other gets them described in a system message."""
        offered = request.tools if request.tool_choice != "none" else []
        if tool_calls.template_knows_tools(self.template):
            return request.messages, [t.openai() for t in offered] or None
        messages = tool_calls.history_as_text(request.messages)
        if offered:
            note = tool_calls.instructions(offered)
            if messages[0]["role"] == "system":
                first = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
                messages = [first, *messages[1:]]
            else:
                messages = [{"role": "system", "content": note}, *messages]
        return messages, None

    async def _tooling(self, request: ChatRequest) -> tuple[Tooling | None, str | None]:
        """How calls are recognised in the answer, and the grammar that forces them (every
        tool's schema is checked, forced or not, so a bad one is refused either way)."""
        if not request.tools or request.tool_choice == "none":
            return None, None
        kind = (
            tool_calls.family(self.template)
            if tool_calls.template_knows_tools(self.template)
            else tool_calls.HERMES
        )
        for i, tool in enumerate(request.tools):
            param = request.paths.schema_of(i)
            what = f"the parameters schema of tool {tool.name!r}"
            try:
                check_schema(tool.parameters, self.grammars.budget)
                await self.grammars.tools([dataclasses.asdict(tool)], kind, False)
            except GrammarBudgetExceeded as exc:
                raise bad(param, f"{what} is over the grammar budget: {exc}") from None
            except GrammarRefused as exc:
                raise bad(param, f"{what} cannot be compiled into a grammar: {exc}") from None
        forced = request.forced_tools
        grammar = None
        if forced:
            try:
                grammar = await self.grammars.tools(
                    [dataclasses.asdict(t) for t in forced], kind, request.parallel_tool_calls
                )
            except GrammarRefused as exc:
                message = f"the tools cannot be compiled into a grammar: {exc}"
                raise bad(request.paths.tools, message) from None
        names = {t.name for t in request.tools}
        return Tooling(kind, names, bool(forced), request.parallel_tool_calls), grammar

    async def chat(self, request: ChatRequest) -> Prepared:
        """A chat request checked against the model.

        Raises:
            ApiError: 400 naming the field (``param``), ``context_length_exceeded`` among them.
        """
        prompt = self.chat_tokens(request)
        tooling, grammar = await self._tooling(request)
        stop = tuple(dict.fromkeys((*request.generation.stop, *self.turn_stops)))
        paths = request.paths
        max_tokens, sampling = await self._generation(
            [prompt], request.generation, grammar, chat=True,
            prompt_param=paths.messages, completion_param=paths.max_tokens,
            schema_param=paths.response_format,
        )  # fmt: skip
        return Prepared([prompt], max_tokens, sampling, stop, tooling)

    # -- completions -------------------------------------------------------------------

    async def completion(self, request: CompletionRequest) -> Prepared:
        """A completion request checked against the model.

        Raises:
            ApiError: 400 naming the field (``param``).
        """
        prompts = [self._completion_prompt(p, request.suffix) for p in request.prompts]
        echo = None
        if request.echo:
            echo = [p if isinstance(p, str) else self._detokenize(p) for p in request.prompts]
        generation = request.generation
        max_tokens, sampling = await self._generation(prompts, generation, None, chat=False)
        return Prepared(prompts, max_tokens, sampling, generation.stop, None, echo, chat=False)

    def _completion_prompt(self, prompt: str | list[int], suffix: str | None) -> list[int]:
        model = self.model
        if isinstance(prompt, list):
            wrong = next((t for t in prompt if t >= model.n_vocab), None)
            if wrong is not None:
                raise bad("prompt", f"token id {wrong} is not in the vocabulary")
            tokens = list(prompt)
        else:
            tokens = model.tokenize(prompt, add_special=True, parse_special=True)
        if suffix is not None:
            pre, suf, mid = (model.token(n) for n in ("fim_pre", "fim_suf", "fim_mid"))
            if min(pre, suf, mid) < 0:
                raise bad("suffix", "this model has no fill-in-the-middle tokens")
            if tokens and tokens[0] == model.token("bos"):
                tokens = tokens[1:]
            tail = model.tokenize(suffix, add_special=False, parse_special=False)
            tokens = [pre, *tokens, suf, *tail, mid]
        if not tokens:
            raise bad("prompt", "'prompt' is empty")
        return tokens

    def _detokenize(self, tokens: list[int]) -> str:
        data = b"".join(self.model.piece(t) for t in tokens)
        return data.decode("utf-8", errors="replace")

    # -- shared ------------------------------------------------------------------------

    async def _generation(
        self,
        prompts: list[list[int]],
        generation: Generation,
        grammar: str | None,
        *,
        chat: bool,
        prompt_param: str | None = None,
        completion_param: str = "max_tokens",
        schema_param: str = "response_format",
    ) -> tuple[int, SamplingParams]:
        """``n`` against the slots, the token budget, the response grammar, ``logit_bias``
        against the vocabulary: the answer's length and its sampler."""
        if generation.n > self.slots:
            raise bad("n", f"'n' may be at most {self.slots} on this node (its slots per model)")
        limit = self.n_ctx_seq
        longest = max(len(p) for p in prompts)
        room = limit - longest
        wanted = generation.max_tokens
        if (room < 1) if wanted is None else (wanted > room):
            raise ContextLengthExceeded(
                limit, longest, wanted, chat=chat, prompt_param=prompt_param,
                completion_param=completion_param,
            )  # fmt: skip
        max_tokens = min(self.default_max_tokens, room) if wanted is None else wanted
        if grammar is None and generation.grammar_schema is not None:
            grammar = await self._response_grammar(generation.grammar_schema, schema_param)
        s = generation.sampling
        wrong = next((t for t in s.logit_bias if t >= self.model.n_vocab), None)
        if wrong is not None:
            raise bad("logit_bias", f"'logit_bias' token id {wrong} is not in the vocabulary")
        # Fields the request left unset take the model's stored defaults (model_defaults).
        s = model_defaults.apply(s, self.model_dir)
        return max_tokens, dataclasses.replace(s, grammar=grammar)

    async def _response_grammar(self, schema: dict[str, Any] | str, param: str) -> str:
        """The grammar of a response format (JSON mode, or a JSON schema), or 400."""
        if schema == "json_object":
            from llama_cpp.llama_grammar import JSON_GBNF

            return str(JSON_GBNF)
        try:
            check_schema(schema, self.grammars.budget)
            return await self.grammars.schema(schema)
        except GrammarBudgetExceeded as exc:
            raise bad(param, f"the JSON schema is over the grammar budget: {exc}") from None
        except GrammarRefused as exc:
            raise bad(
                param, f"the JSON schema cannot be compiled into a grammar: {exc}"
            ) from None
