"""The node's HTTP surface: routes, auth, and one parser/renderer pair per API dialect.

:mod:`.app` holds the routes only; :mod:`.auth` the bearer check; the OpenAI chat and
completions (:mod:`.openai_request`, :mod:`.openai_response`), Responses (:mod:`.responses`)
and Anthropic Messages (:mod:`.anthropic`) modules each parse a client's body into the typed
contract (:mod:`llmlb.node.inference.contract`), with the readers they share in
:mod:`.fields`, and render the engine's typed answer or events in that dialect.

May import :mod:`llmlb.node.inference`, :mod:`llmlb.node.models`,
:mod:`llmlb.node.fleet` and shared modules; nothing below imports this package.
"""
