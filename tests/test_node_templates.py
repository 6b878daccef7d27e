"""Stop strings implied by chat templates: the demo's Gemma template ends at its markers."""

from __future__ import annotations

from llmlb.node.inference.templates import GEMMA_CHAT_TEMPLATE, turn_stop_strings


def test_gemma_template_stops_at_its_turn_markers() -> None:
    assert turn_stop_strings(GEMMA_CHAT_TEMPLATE) == ("<end_of_turn>", "<start_of_turn>")


def test_chatml_template_and_none() -> None:
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    assert turn_stop_strings(chatml) == ("<|im_end|>", "<|im_start|>")
    assert turn_stop_strings(None) == ()
    assert turn_stop_strings("{{ messages[0].content }}") == ()
