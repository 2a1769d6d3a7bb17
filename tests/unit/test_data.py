"""data.py against facts stated in shared/data/README.md and hand-made files."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from routehead_rag.data.beir import CandidateSource, available_sets, load_beir, resolve_data_dir
from routehead_rag.data.beir_files import DataFormatError, DataWarning, Document, load_qrels
from routehead_rag.data.candidates import first_stage_lists
from routehead_rag.data.protocol import PROTOCOL, Role, load_protocol_set, protocol_queries, select_queries
from routehead_rag.engine.prompt import cut_words
from routehead_rag.eval.metrics import candidate_recall, evaluate, rankings_to_run
from routehead_rag.paths import checkout_root, default_data_dir

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ROUTEHEAD_DATA") or REPO / ".." / "shared" / "data").resolve()
needs_data = pytest.mark.skipif(
    not (DATA / "trec-dl-2019" / "corpus.jsonl").is_file(),
    reason=f"shared data not found at {DATA} (set ROUTEHEAD_DATA to the folder of the BEIR sets)",
)


@functools.cache
def load(name: str, split: str = "test"):
    return load_beir(DATA / name, split=split)


# ---------------------------------------------------------------- cut_words


def test_cut_words_counts_words_across_lines_and_keeps_line_breaks():
    assert cut_words("Title\nA  b\tc", 2) == "Title\nA"
    assert cut_words("Title\nA  b\tc", 10) == "Title\nA b c"
    assert cut_words("  one two  three ", 2) == "one two"
    assert cut_words("a\n\n\nb", 5) == "a\nb"
    assert cut_words("a b", 0) == ""
    assert cut_words("a b", None) == "a b"
    with pytest.raises(ValueError):
        cut_words("a", -1)


@pytest.mark.parametrize("n", [0, 1, 3, 7, 100])
def test_cut_words_keeps_exactly_the_first_words(n):
    text = "Alpha beta\n gamma\t\tdelta epsilon\n\nzeta eta theta"
    assert cut_words(text, n).split() == text.split()[:n]


def test_as_passage_includes_title_then_cuts():
    doc = Document("d1", "My Title", " ".join(f"w{i}" for i in range(200)))
    passage = doc.as_passage()
    assert passage.startswith("My Title\nw0 w1")
    assert len(passage.split()) == 100  # 2 title words + 98 text words
    assert passage.split()[-1] == "w97"
    assert Document("d2", "", "just text").as_passage() == "just text"
    assert Document("d3", "  ", "text").full_text == "text"  # a blank title is no title


# ---------------------------------------------------------------- data folder


def test_default_data_dir_env_then_checkout_never_the_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTEHEAD_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()
    monkeypatch.delenv("ROUTEHEAD_DATA")
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)  # the current directory plays no part
    assert checkout_root() == REPO
    assert default_data_dir() == (REPO.parent / "shared" / "data").resolve()


def test_a_set_name_is_looked_up_in_the_data_dir_never_beside_the_cwd(monkeypatch, tmp_path):
    (tmp_path / "shared" / "data" / "toy").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("ROUTEHEAD_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=r"looked up in \$ROUTEHEAD_DATA \(.*elsewhere\)"):
        resolve_data_dir("toy")
    with pytest.raises(FileNotFoundError, match="it is not a folder"):
        resolve_data_dir("../shared/data/nope")


def _write_set(root: Path, *, corpus=None, queries=None, qrels=None, candidates=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Cats", "text": "cats purr"},
        {"_id": "d2", "title": "", "text": "dogs bark"},
    ]
    if queries is None:
        queries = [{"_id": "q1", "text": "cats"}, {"_id": "q2", "text": "dogs"}]
    qrels = qrels if qrels is not None else "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\n"
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        if isinstance(rows, str):
            (root / name).write_text(rows, encoding="utf-8")
        else:
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    if candidates is not None:
        (root / "candidates.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in candidates), encoding="utf-8"
        )
    return root


def test_resolve_data_dir_by_path_and_name(tmp_path):
    _write_set(tmp_path / "toy")
    assert resolve_data_dir(tmp_path / "toy") == (tmp_path / "toy").resolve()
    assert resolve_data_dir("toy", data_dir=tmp_path) == (tmp_path / "toy").resolve()
    assert available_sets(tmp_path) == ["toy"]
    with pytest.raises(FileNotFoundError, match="looked up in .*, which holds: toy"):
        resolve_data_dir("nope", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="ROUTEHEAD_DATA"):
        resolve_data_dir("nope", data_dir=tmp_path / "empty")


def test_toy_set_loads(tmp_path):
    ds = load_beir(_write_set(tmp_path / "toy"))
    assert ds.name == "toy" and ds.split == "test"
    assert ds.corpus["d1"] == Document("d1", "Cats", "cats purr")
    assert ds.queries == {"q1": "cats", "q2": "dogs"}
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert ds.candidate_source is CandidateSource.CORPUS


# ---------------------------------------------------------------- malformed files


def test_malformed_jsonl_names_file_and_line(tmp_path):
    corpus = '{"_id": "d1", "title": "", "text": "a"}\n\n{"_id": "d2", "text": "b"\n'
    root = _write_set(tmp_path / "bad", corpus=corpus)
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: not valid JSON") as err:
        load_beir(root)
    assert err.value.line == 3 and err.value.path.name == "corpus.jsonl"


def test_missing_field_and_duplicate_id(tmp_path):
    root = _write_set(tmp_path / "a", queries=[{"_id": "q1", "text": "x"}, {"_id": "q2"}])
    with pytest.raises(DataFormatError, match=r"queries\.jsonl:2: missing field 'text'"):
        load_beir(root)
    root = _write_set(
        tmp_path / "b",
        corpus=[{"_id": "d1", "text": "x"}, {"_id": "d2", "text": "y"}, {"_id": "d1", "text": "z"}],
    )
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:3: duplicate _id 'd1' \(first on"):
        load_beir(root)


def test_bad_qrels_rows(tmp_path):
    root = _write_set(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: relevance grade 'yes'"):
        load_beir(root)
    root = _write_set(tmp_path / "b", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:3: .*graded 2 here and 1 on line 2"):
        load_beir(root)
    root = _write_set(tmp_path / "c", qrels="query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(DataFormatError, match=r"test\.tsv:2: query 'q9' is not in queries\.jsonl"):
        load_beir(root)


def test_qrel_with_missing_document_warns_and_is_kept(tmp_path):
    root = _write_set(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tgone\t1\n")
    with pytest.warns(DataWarning, match=r"1 qrel\(s\) .*line 3, query 'q1', doc 'gone'"):
        ds = load_beir(root)
    assert ds.qrels["q1"] == {"d1": 1, "gone": 1}


def test_missing_split_and_missing_file(tmp_path):
    root = _write_set(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"train\.tsv: file not found; splits of a: test"):
        load_beir(root, split="train")
    (root / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries\.jsonl"):
        load_beir(root)


def test_bad_candidates(tmp_path):
    root = _write_set(tmp_path / "a", candidates=[{"query_id": "q1", "doc_ids": ["d1", "d404"]}])
    with pytest.raises(DataFormatError, match=r"candidates\.jsonl:1: 1 doc_ids not in corpus"):
        load_beir(root)
    mixed = [
        {"query_id": "q1", "doc_ids": ["d1"], "scores": [1.0]},
        {"query_id": "q2", "doc_ids": ["d2"]},
    ]
    with pytest.raises(DataFormatError, match=r"candidates\.jsonl:2: 'scores' must be on every"):
        load_beir(_write_set(tmp_path / "b", candidates=mixed))
    rising = [{"query_id": "q1", "doc_ids": ["d1", "d2"], "scores": [1.0, 2.0]}]
    with pytest.raises(DataFormatError, match="not in first-stage order"):
        load_beir(_write_set(tmp_path / "c", candidates=rising))


def test_candidate_source_is_read_off_the_files(tmp_path):
    ranking = [{"query_id": q, "doc_ids": ["d2", "d1"], "scores": [2.0, 1.0]} for q in ("q1", "q2")]
    pool = [{"query_id": q, "doc_ids": ["d2", "d1"]} for q in ("q1", "q2")]
    ds_rank = load_beir(_write_set(tmp_path / "r", candidates=ranking))
    ds_pool = load_beir(_write_set(tmp_path / "p", candidates=pool))
    assert ds_rank.candidate_source is CandidateSource.RANKING
    assert ds_pool.candidate_source is CandidateSource.POOL
    ranked = first_stage_lists(ds_rank, ["q1"], top_k=1)["q1"]
    assert (ranked.doc_ids, ranked.scores) == (["d2"], [2.0])
    # a pool's source order is not a ranking: its candidates are BM25 over the pool ("cats" only matches d1's title)
    assert first_stage_lists(ds_pool, ["q1"])["q1"].doc_ids == ["d1", "d2"]
    assert first_stage_lists(ds_pool, ["q1"], top_k=1)["q1"].doc_ids == ["d1"]  # a pool longer than k: its top k
    ds_corpus = load_beir(_write_set(tmp_path / "c"))
    assert first_stage_lists(ds_corpus, ["q2"])["q2"].doc_ids == ["d2"]  # only matching docs
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        first_stage_lists(ds_corpus, ["q2"], top_k=0)
    with pytest.raises(ValueError, match="first stage must be one of"):
        first_stage_lists(ds_corpus, ["q2"], kind="sparse")


# ---------------------------------------------------------------- the shared sets

# (#queries with qrels, #docs, #qrels rows, candidates) from data/README.md's table
README_TABLE = {
    "trec-dl-2019": (43, 4297, 2257, CandidateSource.RANKING),
    "trec-dl-2020": (54, 5396, 2864, CandidateSource.RANKING),
    "beir-scifact": (300, 5183, 339, CandidateSource.CORPUS),
    "beir-arguana": (1401, 8674, 1401, CandidateSource.CORPUS),
    "hotpotqa-distractor-dev500": (500, 4858, 1000, CandidateSource.POOL),
    "musique-ans-migres200": (200, 3141, 478, CandidateSource.POOL),
    "musique-ans-train100": (100, 1890, 237, CandidateSource.POOL),
    "cacm": (52, 3204, 796, CandidateSource.CORPUS),
    "npl": (93, 11426, 2083, CandidateSource.CORPUS),
}


@needs_data
@pytest.mark.parametrize("name", sorted(README_TABLE))
def test_sets_match_the_readme_table(name):
    n_q, n_docs, n_rows, source = README_TABLE[name]
    ds = load(name)
    assert len(ds.qrels) == n_q
    assert len(ds.corpus) == n_docs
    assert sum(len(v) for v in ds.qrels.values()) == n_rows
    assert ds.candidate_source is source


@needs_data
def test_scifact_train_split():
    ds = load("beir-scifact", "train")
    assert len(ds.qrels) == 809
    assert sum(len(v) for v in ds.qrels.values()) == 919
    assert not set(ds.qrels) & set(load("beir-scifact").qrels)  # train and test disjoint
    assert len(ds.queries) == 1109


@needs_data
def test_arguana_unresolved_qrels_are_separate():
    ds = load("beir-arguana")
    assert len(ds.queries) == 1406 and len(ds.qrels) == 1401
    unresolved = load_qrels(ds.path / "qrels_unresolved.tsv")
    assert len(unresolved) == 5
    assert not set(unresolved) & set(ds.qrels)
    assert all(d not in ds.corpus for judged in unresolved.values() for d in judged)


@needs_data
def test_protocol_query_counts_and_disjoint_splits():
    selected: dict[tuple[str, Role], list[str]] = {}
    for entry in PROTOCOL.entries:
        ds = load(entry.name, entry.split)
        ids = protocol_queries(ds, entry.role)
        assert ids == sorted(ids) and len(ids) == entry.n_queries
        assert all(q in ds.qrels for q in ids)
        selected[entry.name, entry.role] = ids

    def total(role):
        return sum(len(selected[e.name, e.role]) for e in PROTOCOL.entries_for(role))

    assert total("fit") == 809 + 100 + 400 + 43 + 1000 + 400 + 40  # six domains; stackfaq: its first 40 threads
    assert len(PROTOCOL.domains(Role.FIT)) == 6
    fit_sets = {e.name for e in PROTOCOL.entries_for(Role.FIT)}
    test_sets = {e.name for role in (Role.IN_DOMAIN_TEST, Role.CROSS_DOMAIN_TEST) for e in PROTOCOL.entries_for(role)}
    for name in fit_sets & test_sets:  # a set in both roles: its fit and test queries never overlap
        assert not set(selected[name, Role.FIT]) & set(selected[name, Role.IN_DOMAIN_TEST])
    nq = selected["nq-open-gold2655", Role.FIT]
    assert nq == sorted(load("nq-open-gold2655").qrels)[:1000]  # the first 1,000 by string order
    assert total(Role.IN_DOMAIN_TEST) == 300 + 100
    assert total(Role.CROSS_DOMAIN_TEST) == 54 + 200 + 200 + 52 + 93
    hp_fit = selected["hotpotqa-distractor-dev500", Role.FIT]
    hp_test = selected["hotpotqa-distractor-dev500", Role.IN_DOMAIN_TEST]
    assert not set(hp_fit) & set(hp_test)
    assert sorted(hp_fit + hp_test) == sorted(load("hotpotqa-distractor-dev500").qrels)
    assert max(hp_fit) < min(hp_test)  # first 400 / last 100 by string order
    arg = selected["beir-arguana", Role.CROSS_DOMAIN_TEST]
    assert arg == sorted(load("beir-arguana").qrels)[:200]


@needs_data
def test_protocol_refuses_the_wrong_split():
    with pytest.raises(ValueError, match=r"split='train'"):
        protocol_queries(load("beir-scifact"), "fit")
    with pytest.raises(KeyError, match="no 'fit' split"):
        protocol_queries(load("npl"), "fit")
    ds, ids = load_protocol_set("beir-scifact", "fit", data_dir=DATA)
    assert ds.split == "train" and len(ids) == 809


@needs_data
def test_select_queries_first_and_last():
    ds = load("cacm")
    every = select_queries(ds)
    assert every == sorted(ds.qrels) and len(every) == 52
    assert every[:3] == ["1", "10", "11"]  # sorted as strings, not numbers
    assert select_queries(ds, 5) == every[:5]
    assert select_queries(ds, 5, last=True) == every[-5:]
    assert select_queries(ds, 0, last=True) == []


@needs_data
def test_trec_dl_2019_bm25_reference_ndcg():
    """README reference: BM25 first 20 of candidates.jsonl, qrels/test.tsv -> 0.5456."""
    ds = load("trec-dl-2019")
    ids = protocol_queries(ds, "fit")
    cands = {q: c.doc_ids for q, c in first_stage_lists(ds, ids, top_k=20).items()}
    assert all(len(c) == 20 for c in cands.values())
    assert all(cands[q] == ds.candidates[q][:20] for q in ids)
    ndcg = evaluate(rankings_to_run(cands), ds.qrels, qids=ids)["nDCG@10"]
    assert ndcg == pytest.approx(0.5456, abs=5e-4)
    full = load_qrels(ds.path / "qrels_full_nist.tsv")  # README: 0.5058 with the full qrels
    ndcg_full = evaluate(rankings_to_run(cands), full, qids=ids)["nDCG@10"]
    assert ndcg_full == pytest.approx(0.5058, abs=5e-4)
    assert 0 < candidate_recall(cands, ds.qrels, k=20, rel=PROTOCOL.spec(ds.name).binary_rel) < 1


@needs_data
def test_trec_dl_2020_bm25_reference_ndcg():
    ds = load("trec-dl-2020")
    ids = protocol_queries(ds, Role.CROSS_DOMAIN_TEST)
    run = rankings_to_run({q: c.doc_ids for q, c in first_stage_lists(ds, ids).items()})
    assert evaluate(run, ds.qrels, qids=ids)["nDCG@10"] == pytest.approx(0.5516, abs=5e-4)


@needs_data
def test_musique_source_order_reference_ndcg_and_pool_bm25():
    """README reference: musique-ans-migres200, first 60 q by id, source order -> 0.2814."""
    ds = load("musique-ans-migres200")
    ids = select_queries(ds, 60)
    pools = {q: ds.candidates[q] for q in ids}  # the source order (not a ranking: never a candidate list)
    assert all(len(pools[q]) == 20 for q in ids)
    ndcg = evaluate(rankings_to_run(pools), ds.qrels, qids=ids)["nDCG@10"]
    assert ndcg == pytest.approx(0.2814, abs=5e-4)
    ranked = {q: c.doc_ids for q, c in first_stage_lists(ds, ids).items()}
    assert all(sorted(ranked[q]) == sorted(pools[q]) for q in ids)  # a permutation of the pool
    assert candidate_recall(ranked, ds.qrels, k=20, qids=ids) == 1.0  # gold is always in the pool
    assert evaluate(rankings_to_run(ranked), ds.qrels, qids=ids)["nDCG@10"] > 0.5


@needs_data
def test_arguana_drops_the_query_itself():
    from routehead_rag.data.first_stage import Bm25Index

    ds = load("beir-arguana")
    ids = protocol_queries(ds, Role.CROSS_DOMAIN_TEST)[:25]
    index = Bm25Index(ds.corpus)
    kept = {q: c.doc_ids for q, c in first_stage_lists(ds, ids, 20, bm25_index=index, drop_self_match=False).items()}
    dropped = {q: c.doc_ids for q, c in first_stage_lists(ds, ids, 20, bm25_index=index).items()}  # PROTOCOL: drop
    self_hits = [q for q in ids if q in ds.corpus]
    assert self_hits and all(kept[q][0] == q for q in self_hits)  # the argument finds itself
    assert all(q not in dropped[q] and len(dropped[q]) == 20 for q in ids)
    assert all(dropped[q] == [d for d in kept[q] if d != q] + dropped[q][19:] for q in self_hits)
