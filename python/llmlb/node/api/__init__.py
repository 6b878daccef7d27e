"""The node's HTTP surface: routes, auth, and one parser/renderer pair per API dialect.

:mod:`.app` holds the routes only; :mod:`.auth` the bearer check; the OpenAI chat and
completions (:mod:`.openai_request`, :mod:`.openai_response`), Responses (:mod:`.responses`)
and Anthropic Messages (:mod:`.anthropic`) modules parse a client's body and render the
engine's answer in that dialect.

May import :mod:`llmlb.node.inference`, :mod:`llmlb.node.models`,
:mod:`llmlb.node.fleet` and shared modules; nothing below imports this package.
"""
