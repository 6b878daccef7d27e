"""Chat templates the node knows by name, and where a model directory may carry its own.

A GGUF normally embeds its chat template (``tokenizer.chat_template``). When it does not,
the node looks for a ``chat_template.jinja`` sidecar file in the model's directory (the name
``transformers`` uses), then for the ``chat_template`` of the router's manifest.
"""

from __future__ import annotations

# Sidecar file in a model directory holding its Jinja chat template.
CHAT_TEMPLATE_FILENAME = "chat_template.jinja"

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
