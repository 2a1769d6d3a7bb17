"""Router training on synthetic data with a planted query -> head rule."""

import pytest
import torch
from pydantic import ValidationError

from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.search import SearchConfig, search_heads
from routehead_rag.fit.training import TrainingConfig, choose_depth_cost, routed_ndcg, split_train_dev, train_router
from routehead_rag.heads import Head
from routehead_rag.router.model import Router, RouterConfig, SelectionConfig


def planted(num_queries=200, seed=0):
    """Two kinds of query: kind A is answered by head L0.H1, kind B by head L2.H3; the query
    embedding tells the kinds apart along one direction."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(16, generator=g)
    scores, doc_ids, qrels, embeddings = {}, {}, {}, []
    for q in range(num_queries):
        embedding = torch.randn(16, generator=g)
        kind_a = bool(embedding @ direction > 0)
        tensor = torch.rand(3, 4, 10, generator=g)  # noise heads
        relevant = int(torch.randint(0, 10, (1,), generator=g))
        good = (0, 1) if kind_a else (2, 3)
        bad = (2, 3) if kind_a else (0, 1)
        tensor[good][relevant] += 2.0  # the right head finds the relevant passage
        tensor[bad] = -tensor[good]  # the other planted head points away from it
        qid = f"q{q:03d}"
        scores[qid], doc_ids[qid], qrels[qid] = tensor, [f"d{i}" for i in range(10)], {f"d{relevant}": 1}
        embeddings.append(embedding)
    return scores, doc_ids, qrels, torch.stack(embeddings)


def test_split_is_seeded_and_disjoint():
    groups = [f"q{i}" for i in range(50)]
    a_train, a_dev = split_train_dev(groups, 0.2, seed=3)
    b_train, b_dev = split_train_dev(groups, 0.2, seed=3)
    assert torch.equal(a_train, b_train) and torch.equal(a_dev, b_dev)
    assert 4 <= len(a_dev) <= 16 and not set(a_train.tolist()) & set(a_dev.tolist())
    assert sorted(a_train.tolist() + a_dev.tolist()) == list(range(50))
    # a query's side does not depend on the other queries: a subset splits the same way
    dev_names = {groups[i] for i in a_dev.tolist()}
    _sub_train, sub_dev = split_train_dev(groups[:30], 0.2, seed=3)
    assert {groups[i] for i in sub_dev.tolist()} == {g for g in dev_names if int(g[1:]) < 30}
    assert not torch.equal(split_train_dev(groups, 0.2, seed=4)[1], a_dev)


def test_a_group_stays_on_one_side():
    groups = [f"thread{i // 10}" for i in range(200)]  # 20 groups of 10 paraphrases
    train, dev = split_train_dev(groups, 0.2, seed=0)
    assert {groups[i] for i in train.tolist()}.isdisjoint({groups[i] for i in dev.tolist()})
    assert len(train) and len(dev)
    one_group = ["only"] * 5
    with pytest.raises(ValueError, match="need at least 2 groups"):
        split_train_dev(one_group, 0.2, seed=0)


def test_router_learns_the_planted_rule_and_beats_static():
    scores, doc_ids, qrels, embeddings = planted()
    data = build_labelled_set(scores, doc_ids, qrels)
    labels = search_heads(data, SearchConfig(pool_size=12, max_heads=2)).labels
    config = TrainingConfig(epochs=150, ks=(1, 2), sparsity_weights=(0.0, 0.01))
    result = train_router(embeddings, labels, data, config)
    assert result.dev_ndcg > 0.9
    assert result.dev_ndcg > result.dev_static_ndcg + 0.2
    again = train_router(embeddings, labels, data, config)  # reproducible
    assert again.dev_ndcg == result.dev_ndcg and again.k == result.k
    dev = torch.tensor(result.dev_rows)
    with torch.no_grad():
        logits = result.router(embeddings[dev]).double()
    assert float(routed_ndcg(logits, data, dev, result.k).mean()) == result.dev_ndcg


def biased_router(bias: dict[int, float]) -> Router:
    """A 3-layer x 4-head router whose logits are its head biases for every query (projection zeroed)."""
    router = Router(RouterConfig(input_dim=16, num_layers=3, num_heads=4))
    with torch.no_grad():
        router.head_embeddings.zero_()
        router.head_bias.fill_(-5.0)
        for head, value in bias.items():
            router.head_bias[head] = value
    return router.eval()


def two_good_heads(shallow_helps: bool, num_queries=40):
    """L2.H3 (deep) finds the relevant passage; L0.H2 (shallow) finds it too, or points away."""
    g = torch.Generator().manual_seed(1)
    scores, doc_ids, qrels = {}, {}, {}
    for q in range(num_queries):
        tensor = torch.rand(3, 4, 10, generator=g)
        relevant = q % 10
        tensor[2, 3, relevant] += 2.0
        tensor[0, 2, relevant] += 2.0 if shallow_helps else -2.0
        qid = f"q{q:03d}"
        scores[qid], doc_ids[qid], qrels[qid] = tensor, [f"d{i}" for i in range(10)], {f"d{relevant}": 1}
    return build_labelled_set(scores, doc_ids, qrels)


@pytest.mark.parametrize("shallow_helps", [True, False])
def test_depth_cost_routes_to_equally_good_shallow_heads_only(shallow_helps):
    router = biased_router({11: 2.0, 2: 1.8})  # L2.H3 first, L0.H2 a close second
    data = two_good_heads(shallow_helps)
    rows, embeddings = torch.arange(40), torch.randn(40, 16)
    choice = choose_depth_cost(router, embeddings, data, rows, k=1, costs=(4.0, 0.5), tolerance=0.005)
    assert [row["depth_cost"] for row in choice.curve] == [0.0, 0.5, 4.0]  # 0 always tried, sorted
    assert [row["mean_deepest_layer"] for row in choice.curve] == [2.0, 0.0, 0.0]
    assert choice.curve[0]["layer_share"] == 1.0 and choice.curve[1]["layer_share"] == pytest.approx(1 / 3)
    # equally good shallow head: the smallest cost that reaches it; a bad one: no cost
    assert choice.depth_cost == (0.5 if shallow_helps else 0.0)
    off, on = SelectionConfig(k=1), SelectionConfig(k=1, depth_cost=0.5)
    assert router.select(embeddings[0], off) == [Head(2, 3)]
    assert router.select(embeddings[0], on) == [Head(0, 2)]


def test_depth_cost_settings_are_checked():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValidationError):
            SelectionConfig(depth_cost=bad)
    with pytest.raises(ValidationError, match="finite and >= 0"):
        TrainingConfig(depth_costs=(0.0, -2.0))
    assert SelectionConfig.model_validate({"mode": "top_k", "k": 2}).depth_cost == 0.0  # older artifacts: off


def test_training_in_pieces_takes_the_full_batch_gradient():
    """A train set larger than TRAIN_CHUNK sums the full-batch gradient over pieces: the same update."""
    import routehead_rag.fit.training as training

    torch.manual_seed(0)
    config = RouterConfig(input_dim=16, num_layers=3, num_heads=4, dim=8, hidden=16)
    x, y = torch.randn(50, 16), (torch.rand(50, 12) > 0.7).float()
    rows = torch.randperm(50)[:37]
    whole, pieces = Router(config), Router(config)
    pieces.load_state_dict(whole.state_dict())
    loss_whole = training.full_batch_backward(whole, x, y, rows, sparsity=0.1)
    original = training.TRAIN_CHUNK
    try:
        training.TRAIN_CHUNK = 8  # 37 rows: five pieces
        loss_pieces = training.full_batch_backward(pieces, x, y, rows, sparsity=0.1)
    finally:
        training.TRAIN_CHUNK = original
    assert loss_pieces == pytest.approx(loss_whole, rel=1e-6)
    for (name, a), b in zip(whole.named_parameters(), pieces.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-7, rtol=1e-5, msg=name)


def test_routing_in_pieces_picks_the_heads_of_one_pass():
    """route_top_k runs the router on pieces of QUERY_CHUNK rows; its picks equal top-k of one pass over every
    row (the reference: the router's logits minus the depth penalty, ranked by torch.topk), for every cost."""
    import routehead_rag.fit.training as training

    torch.manual_seed(0)
    router = Router(RouterConfig(input_dim=16, num_layers=3, num_heads=4, dim=8, hidden=16)).eval()
    x = torch.randn(37, 16)
    rows = torch.randperm(37)[:29]
    costs = [0.0, 2.0, 8.0]
    with torch.no_grad():
        logits = router(x[rows]).double()
    expected = [torch.topk(router.selection_logits(logits, c), k=3, dim=1).indices for c in costs]
    original = training.QUERY_CHUNK
    try:
        training.QUERY_CHUNK = 8  # 29 rows: four pieces
        pieces = training.route_top_k(router, x, 3, costs, rows)
    finally:
        training.QUERY_CHUNK = original
    whole = training.route_top_k(router, x, 3, costs, rows)
    for got, one_pass, want in zip(pieces, whole, expected):
        assert got.shape == (29, 3)
        assert torch.equal(got, want) and torch.equal(one_pass, want)
    # a larger depth cost never routes deeper on average
    layers = [torch.div(top, 4, rounding_mode="floor").max(dim=1).values.double().mean() for top in pieces]
    assert layers[0] >= layers[1] >= layers[2]
