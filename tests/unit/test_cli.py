"""The CLI end to end on a tiny model saved to a folder and a tiny BEIR-layout set."""

import json

import pytest
from typer.testing import CliRunner

from routehead_rag.cli import app
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-beir")
    topics = ["moon tides sea", "stock market prices", "basketball players court", "bread bananas recipe"]
    docs = []
    for t, topic in enumerate(topics):
        for i in range(3):
            docs.append({"_id": f"d{t}{i}", "title": "", "text": f"{topic} passage {i} about {topic.split()[0]}"})
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    queries = [{"_id": f"q{t}", "text": f"what about {topic}"} for t, topic in enumerate(topics)]
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (folder / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{t}\td{t}0\t1" for t in range(len(topics))]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_rerank_with_a_local_model_folder(model_dir, tmp_path):
    passages = tmp_path / "passages.jsonl"
    passages.write_text('{"id": "a", "text": "the moon pulls the sea"}\n{"id": "b", "text": "stock prices fell"}\n')
    result = runner.invoke(app, ["rerank", "sea", "--file", str(passages), "--model", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["rank"] for line in lines] == [1, 2]
    assert {line["id"] for line in lines} == {"a", "b"}


def test_rerank_without_passages_is_a_usage_error(model_dir):
    result = runner.invoke(app, ["rerank", "sea", "--model", str(model_dir)])
    assert result.exit_code != 0
    assert "give passages" in result.output


@pytest.mark.parametrize("strategy", ["bm25", "all"])
def test_eval_writes_the_metrics_json(strategy, model_dir, beir_dir, tmp_path):
    output = tmp_path / f"{strategy}.json"
    result = runner.invoke(app, [
        "eval", str(beir_dir), "--strategy", strategy, "--model", str(model_dir), "--top-k", "5",
        "--output", str(output), "--cache-dir", str(tmp_path / "cache"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(output.read_text())
    assert data["dataset"] == beir_dir.name and data["strategy"] == strategy and data["queries"] == 4
    assert 0.0 <= data["ndcg@10"] <= 1.0 and 0.0 <= data["recall@5"] <= 1.0 and data["top_k"] == 5


def test_select_heads_then_static_eval(model_dir, beir_dir, tmp_path):
    heads_file = tmp_path / "heads.json"
    cache = str(tmp_path / "cache")
    result = runner.invoke(app, [
        "select-heads", str(beir_dir), "--k", "2", "--out", str(heads_file), "--model", str(model_dir),
        "--top-k", "5", "--cache-dir", cache,
    ])
    assert result.exit_code == 0, result.output
    heads = json.loads(heads_file.read_text())["heads"]
    assert len(heads) == 2 and all(h.startswith("L") for h in heads)
    output = tmp_path / "static.json"
    result = runner.invoke(app, [
        "eval", str(beir_dir), "--strategy", "static", "--heads", str(heads_file), "--model", str(model_dir),
        "--top-k", "5", "--output", str(output), "--cache-dir", cache,
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())["strategy"] == "static"


def test_static_without_heads_is_a_usage_error(beir_dir):
    result = runner.invoke(app, ["eval", str(beir_dir), "--strategy", "static"])
    assert result.exit_code != 0
    assert "--heads" in result.output


def test_fit_then_routed_and_static_eval(model_dir, beir_dir, tmp_path):
    from tests.unit.test_fit import write_log

    log = write_log(tmp_path / "log.jsonl")
    router = tmp_path / "router"
    cache = str(tmp_path / "cache")
    result = runner.invoke(app, ["fit", str(log), "--out", str(router), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "20", "--cache-dir", cache])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["artifact"] == str(router) and "routed_ndcg@10" in summary
    for strategy in ("routed", "static"):
        output = tmp_path / f"{strategy}.json"
        result = runner.invoke(app, [
            "eval", str(beir_dir), "--strategy", strategy, "--router", str(router), "--model", str(model_dir),
            "--top-k", "5", "--output", str(output), "--cache-dir", cache,
        ])
        assert result.exit_code == 0, result.output
        data = json.loads(output.read_text())
        assert data["strategy"] == strategy and data["router"] == str(router)


def test_routed_without_router_is_a_usage_error(model_dir, beir_dir):
    # no router ships for this (tiny) backbone, so --strategy routed needs --router
    result = runner.invoke(app, ["eval", str(beir_dir), "--strategy", "routed", "--model", str(model_dir)])
    assert result.exit_code != 0
    assert "--router" in result.output and "no router ships" in result.output
