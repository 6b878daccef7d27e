"""Chat templates the node knows by name, and where a model directory may carry its own.

A GGUF normally embeds its chat template (``tokenizer.chat_template``). When it does not,
the node looks for a ``chat_template.jinja`` sidecar file in the model's directory (the name
``transformers`` uses), then for the ``chat_template`` of the router's manifest.
"""

from __future__ import annotations

from llmlb.model_storage import CHAT_TEMPLATE_FILENAME as CHAT_TEMPLATE_FILENAME

# Gemma 2/3 instruction format: ``<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n``.
# A leading system message is folded into the first user turn (Gemma has no system role).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)

# Markers that end a turn, or start the next one (a model that opens a new turn has ended
# its own), for the chat formats the node meets: Gemma, ChatML, Llama 3, Phi-3.
TURN_MARKERS = (
    "<end_of_turn>",
    "<start_of_turn>",
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end|>",
)


def turn_stop_strings(template: str | None) -> tuple[str, ...]:
    """The stop strings a chat ``template`` implies: the turn markers it writes.

    A model's own answer never contains them, so generation stops at the first one (even
    when the model writes it as plain text rather than as its special token).
    """
    if not template:
        return ()
    return tuple(marker for marker in TURN_MARKERS if marker in template)
