"""Test doubles shipped with llmlb (never imported by the router or the node)."""
