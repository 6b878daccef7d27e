"""Pieces (:mod:`llmlb.node.models.pieces`): the cut of a file, the bitfield of a piece map,
the hashes a map carries after ``since``, and which ranges a partial file may serve."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from llmlb.node.models.pieces import (
    PieceBoard,
    decode_bits,
    encode_bits,
    hash_pieces,
    piece_count,
    piece_span,
)


def test_a_file_is_cut_in_fixed_pieces_the_last_one_shorter():
    assert piece_count(0, 4) == 0 and piece_count(8, 4) == 2 and piece_count(9, 4) == 3
    assert piece_span(2, 9, 4) == (8, 9)
    assert piece_span(0, 9, 4) == (0, 4)


def test_the_bitfield_is_msb_first_and_checked_on_the_way_in():
    bits = [True, False, False, False, False, False, False, True, True]
    text = encode_bits(bits)
    assert text == "gYA="  # 0b10000001, 0b10000000
    assert decode_bits(text, 9) == bits
    with pytest.raises(ValueError):
        decode_bits(text, 17)  # a bitfield of 2 bytes is no map of 17 pieces
    with pytest.raises(ValueError):
        decode_bits("not base64!", 9)


def test_a_map_carries_each_hash_once_and_a_partial_serves_only_held_pieces(tmp_path: Path):
    board = PieceBoard()
    entry = board.open("m", "f.gguf", 10, 4, "rev", tmp_path / "f.part")
    board.claim(entry, 1, True)
    board.landed(entry, 0, "a" * 64)
    first = board.map(entry, None, uploads=2, visitor="node-b")
    assert first["have"] == encode_bits([True, False, False])
    assert first["hashes"] == {"0": "a" * 64} and first["hub"] == [1]
    assert (first["size"], first["piece_size"], first["revision"]) == (10, 4, "rev")
    assert first["uploads"] == 2 and not first["complete"]
    board.landed(entry, 2, "c" * 64)
    later = board.map(entry, first["seq"], uploads=0)
    assert later["hashes"] == {"2": "c" * 64}  # only what landed since
    assert board.map(entry, 10**9, uploads=0)["hashes"].keys() == {"0", "2"}  # a stale since
    assert board.visitors(entry, 60.0) == ["node-b"]
    assert board.covers(entry, 0, 4)[0] and board.covers(entry, 8, 10)[0]
    assert not board.covers(entry, 3, 5)[0]  # touches piece 1, not held
    assert not board.covers(entry, 0, 11)[0] and not board.covers(entry, 4, 4)[0]
    reopened = board.open("m", "f.gguf", 10, 4, "rev", tmp_path / "f.part")
    assert reopened.epoch != entry.epoch and not any(reopened.have)
    board.drop("m")
    assert board.get("m", "f.gguf") is None


def test_hash_pieces_hashes_each_piece_of_a_file(tmp_path: Path):
    data = bytes(range(256)) * 5
    path = tmp_path / "f"
    path.write_bytes(data)
    hashes = hash_pieces(path, len(data), 512)
    assert hashes == [hashlib.sha256(data[i : i + 512]).hexdigest() for i in (0, 512, 1024)]
    with pytest.raises(OSError):
        hash_pieces(path, len(data) + 1, 512)
