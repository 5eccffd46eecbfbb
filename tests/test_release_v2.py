"""Bundle format version 2 (docs/bundle-format.md, "Version 2"): one payload per release, one
envelope per device under a signed Merkle root, installed with real crypto and onnxruntime."""

from __future__ import annotations

import hashlib

import pytest

from device_agent import crypto
from device_agent.errors import IntegrityError


def _rfc9162_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, written from the RFC's recursive definition (the tree splits at the largest
    power of two below n)."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while 2 * k < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _rfc9162_root(leaves[:k]) + _rfc9162_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64, 100])
def test_merkle_tree_is_rfc9162s_and_every_proof_leads_only_to_its_own_leaf(n: int) -> None:
    leaves = [crypto.merkle_leaf(b"t", i.to_bytes(4, "big")) for i in range(n)]
    tree = crypto.MerkleTree(b"".join(leaves))
    assert tree.root == _rfc9162_root(leaves)
    for i in range(n):
        proof = tree.proof(i)
        assert len(proof) == crypto.merkle_proof_length(i, n)
        assert crypto.merkle_root_from_proof(leaves[i], i, n, proof) == tree.root
        other = (i + 1) % n
        if other != i:  # the proof of leaf i does not prove leaf i+1, nor leaf i at another index
            assert crypto.merkle_root_from_proof(leaves[other], i, n, proof) != tree.root
            try:
                moved = crypto.merkle_root_from_proof(leaves[i], other, n, proof)
            except IntegrityError:
                continue  # a proof of another length than that index's path
            assert moved != tree.root
    with pytest.raises(IntegrityError):
        crypto.merkle_root_from_proof(leaves[0], 0, n, [*tree.proof(0), leaves[0]])
    with pytest.raises(IntegrityError):
        crypto.merkle_root_from_proof(leaves[0], n, n, tree.proof(0))


def test_a_leaf_never_passes_for_a_node() -> None:
    """Leaves and nodes are hashed under different prefixes (RFC 9162 2.1.1): two leaves' node
    hash given as a leaf of a one-leaf tree is not that tree's root."""
    a, b = crypto.merkle_leaf(b"t", b"a"), crypto.merkle_leaf(b"t", b"b")
    node = crypto.MerkleTree(a + b).root
    assert crypto.merkle_leaf(b"t", a + b) != node
