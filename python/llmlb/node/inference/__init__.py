"""Inference: turning a validated request into tokens on llama.cpp.

Today this package holds the grammar guard (budgets, the isolated compiler, per-token
bounds); the engine, scheduler and samplers move here with the structure issue. Nothing in
it imports the node's HTTP routes (``llmlb.node.app`` and the dialect modules).
"""
