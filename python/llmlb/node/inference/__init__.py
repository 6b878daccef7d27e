"""Inference: a validated request turned into tokens on llama.cpp.

The typed requests and events every API dialect speaks to the engine (:mod:`.contract`),
which models are resident (:mod:`.engine`), prompts and their validation against the model
(:mod:`.prompts`), chat templates and tool prompts
(:mod:`.chat_format`, :mod:`.templates`, :mod:`.tool_calls`), JSON schemas as grammars
(:mod:`.schema_grammar`) and the grammar guard (budgets, the isolated compiler), the
scheduler that batches every active slot of one context (:mod:`.scheduler`, its slots in
:mod:`.slots`), sampling, generation, the prompt cache in slots and RAM and the
directory of what they hold, embeddings, and the thin layer over llama.cpp's C API
(:mod:`.llama_native`).

May import :mod:`llmlb.node.models` (what is on disk) and shared modules; never
:mod:`llmlb.node.api` (the HTTP dialects read this package, not the reverse).
"""
