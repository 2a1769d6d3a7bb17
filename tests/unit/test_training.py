"""Router training on synthetic data with a planted query -> head rule."""

import torch

from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.search import SearchConfig, search_heads
from routehead_rag.fit.training import TrainingConfig, routed_ndcg, split_train_dev, train_router


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
    a_train, a_dev = split_train_dev(50, 0.2, seed=3)
    b_train, b_dev = split_train_dev(50, 0.2, seed=3)
    assert torch.equal(a_train, b_train) and torch.equal(a_dev, b_dev)
    assert len(a_dev) == 10 and not set(a_train.tolist()) & set(a_dev.tolist())


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
