"""Router module: shapes, selection rules, size, and that it can learn a planted query -> head rule."""


import pytest
import torch
from safetensors.torch import save

from routehead_rag.heads import Head
from routehead_rag.router.model import Router, RouterConfig, SelectionConfig


def make_router(**overrides):
    torch.manual_seed(0)
    return Router(RouterConfig(input_dim=32, num_layers=3, num_heads=4, **overrides))


def test_logits_shape_and_input_check():
    router = make_router()
    assert router(torch.randn(5, 32)).shape == (5, 12)
    with pytest.raises(ValueError, match="takes 32"):
        router(torch.randn(5, 31))


def test_selection_modes_and_bounds():
    router = make_router()
    query = torch.randn(32)
    top = router.select(query, SelectionConfig(k=3))
    assert len(top) == 3 and all(isinstance(h, Head) for h in top)
    logits = router(query[None])[0]
    assert [h.layer * 4 + h.head for h in top] == torch.argsort(logits, descending=True)[:3].tolist()
    none_pass = router.select(query, SelectionConfig(mode="threshold", threshold=0.999, min_heads=2, max_heads=5))
    assert len(none_pass) == 2
    all_pass = router.select(query, SelectionConfig(mode="threshold", threshold=0.001, min_heads=1, max_heads=5))
    assert len(all_pass) == 5
    with pytest.raises(ValueError, match="min_heads"):
        SelectionConfig(min_heads=5, max_heads=2)


def test_router_for_the_embedded_backbone_is_small():
    router = Router(RouterConfig(input_dim=576, num_layers=30, num_heads=9))
    size = len(save({k: v.contiguous() for k, v in router.state_dict().items()}))
    assert size < 5 * 2**20


def test_router_learns_a_planted_rule():
    """Queries on one side of a direction want heads 0-1, the others heads 10-11."""
    torch.manual_seed(0)
    router = make_router()
    direction = torch.randn(32)
    embeddings = torch.randn(400, 32)
    side = (embeddings @ direction > 0)
    labels = torch.zeros(400, 12)
    labels[side, 0:2] = 1
    labels[~side, 10:12] = 1
    optimizer = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(router(embeddings), labels)
        loss.backward()
        optimizer.step()
    test = torch.randn(100, 32)
    test_side = test @ direction > 0
    picked = [set(h.layer * 4 + h.head for h in router.select(q, SelectionConfig(k=2))) for q in test]
    correct = sum(p == ({0, 1} if s else {10, 11}) for p, s in zip(picked, test_side.tolist()))
    assert correct >= 90
