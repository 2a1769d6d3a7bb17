"""The CLI end to end on a tiny model saved to a folder and a tiny BEIR-layout set."""

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from routehead_rag.cli import app
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    return write_tiny_beir(tmp_path_factory.mktemp("tiny-beir"))


def write_tiny_beir(folder):
    """A 4-query, 12-passage BEIR-layout set (test qrels) in ``folder``."""
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
    (answer,) = [json.loads(line) for line in result.stdout.strip().splitlines()]  # one JSON object per query
    assert answer["query"] == "sea"
    assert [r["rank"] for r in answer["results"]] == [1, 2]
    assert {r["id"] for r in answer["results"]} == {"a", "b"}


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
        "--top-k", "5", "--cache-dir", cache, "--split", "test",  # the tiny set has test qrels only (default: fit)
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
    from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig
    from routehead_rag.fit.term_weights import BI_ENCODER_WEIGHT_GRID
    from routehead_rag.router.artifact import read_artifact_config

    # fit adds the packaged bi-encoder at the weight leaving domains out chose, unless this fit's dev queries prefer
    # another significantly: every weight's dev figure and the one kept are on the record
    assert {f"bi_encoder_v{v:g}_ndcg@10" for v in BI_ENCODER_WEIGHT_GRID} <= set(summary)
    kept = read_artifact_config(router).bi_encoder
    assert kept.weight == summary["bi_encoder_weight"]
    if kept.weight == DEFAULT_WEIGHT:
        assert kept == BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY)
    else:
        assert kept.chosen_by.startswith("this fit's dev queries")
    card = (router / "README.md").read_text()
    assert f"by weight 5: {summary['bi_encoder_v5_ndcg@10']:.4f}" in card and f"adds {kept.weight:g} x" in card
    given = tmp_path / "given"
    result = runner.invoke(app, ["fit", str(log), "--out", str(given), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "20", "--cache-dir", cache, "--bi-encoder-weight", "forty"])
    assert result.exit_code == 2 and "--bi-encoder-weight 'forty' is neither a number nor 'dev'" in result.output
    assert not given.exists()
    plain = tmp_path / "plain"
    result = runner.invoke(app, ["fit", str(log), "--out", str(plain), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "20", "--cache-dir", cache, "--bi-encoder", "none"])
    assert result.exit_code == 0, result.output
    assert read_artifact_config(plain).bi_encoder is None
    headless = tmp_path / "headless"
    result = runner.invoke(app, ["fit", str(log), "--out", str(headless), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "20", "--cache-dir", cache, "--bi-encoder", "none", "--bi-encoder-head"])
    assert result.exit_code == 2 and "--bi-encoder-head scales the bi-encoder's weight per query, but --bi-encoder " \
        "is 'none'" in result.output and not headless.exists()
    headed = tmp_path / "headed"
    result = runner.invoke(app, ["fit", str(log), "--out", str(headed), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "20", "--cache-dir", cache, "--bi-encoder-head"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"bi_encoder_global_ndcg@10", "bi_encoder_per_query_ndcg@10"} <= set(summary)  # dev decided, on the record
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


# -- failing like a good CLI (issue: one red line, exit 2 for usage errors, 1 at run time) ------


def no_model_loads(monkeypatch):
    import routehead_rag.model.backbone as backbone

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(backbone, "load_backbone", refuse)


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_an_unknown_head_is_a_usage_error_before_the_model_loads(model_dir, beir_dir, monkeypatch):
    no_model_loads(monkeypatch)
    result = runner.invoke(app, ["rerank", "sea", "a passage", "--model", str(model_dir), "--heads", "L99.H99"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "L99.H99 does not exist" in line and "L0.H0 .. L1.H3" in line
    result = runner.invoke(app, ["eval", str(beir_dir), "--strategy", "static", "--heads", "L99.H99",
                                 "--model", str(model_dir)])
    assert result.exit_code == 2 and "L99.H99 does not exist" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "no-such-set", "--strategy", "bm25"], r"no data set 'no-such-set'.*looked up in \$ROUTEHEAD_DATA"),
        (["rerank", "q", "--file", "missing.jsonl"], "'missing.jsonl' is not a file"),
        (["rerank", "q", "p", "--dtype", "int8"], "dtype='int8' is not supported"),
        (["rerank", "q", "p", "--device", "gpu"], "device='gpu' is not a valid torch device"),
        (["rerank", "q", "p", "--model", "./no/such/folder"], "is a path that does not exist"),
        (["rerank", "q", "p", "--no-such-option"], "No such option: --no-such-option"),
        (["eval", "x", "--strategy", "static"], "--strategy static needs --heads"),
        (["select-heads", "x", "--k", "0", "--out", "h.json"], "--k must be at least 1"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message, monkeypatch, tmp_path):
    no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROUTEHEAD_DATA", str(tmp_path / "data"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert re.search(message, one_error_line(result)), result.output


def test_a_bad_passages_file_names_the_line(tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    bad = tmp_path / "passages.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    result = runner.invoke(app, ["rerank", "q", "--file", str(bad)])
    assert result.exit_code == 2 and "passages.jsonl:2: invalid JSON" in one_error_line(result)


def test_a_folder_that_is_not_a_model_is_a_usage_error(tmp_path, monkeypatch):
    no_model_loads(monkeypatch)
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = runner.invoke(app, ["rerank", "q", "p", "--model", str(folder), "--heads", "L0.H0"])
    assert result.exit_code == 2 and "holds no model config transformers can read" in one_error_line(result)


def test_a_model_that_cannot_load_offline_is_a_runtime_error_with_exit_code_1(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    result = runner.invoke(app, ["rerank", "q", "p", "--model", "routehead-tests/not-cached", "--quiet"])
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "not available offline" in line and "smollm2-135m" in line


def test_a_missing_extra_names_the_install_command(monkeypatch, beir_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bm25s" else real(name, *a))
    result = runner.invoke(app, ["eval", str(beir_dir), "--strategy", "bm25"])
    assert result.exit_code == 1
    assert "pip install 'routehead-rag[fit]'" in one_error_line(result)


def test_ray_without_the_extra_names_the_install_command(monkeypatch, beir_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = runner.invoke(app, ["eval", str(beir_dir), "--strategy", "all", "--ray", "local"])
    assert result.exit_code == 1
    assert "pip install 'routehead-rag[ray]'" in one_error_line(result)


def test_version():
    from routehead_rag import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"routehead-rag {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["rerank", "--help"], ["eval", "--help"]])
def test_help_and_version_import_neither_torch_nor_transformers(args):
    code = (
        "import sys\nfrom routehead_rag.cli import main\nsys.argv = ['routehead-rag', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print('heavy:', sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "heavy: []", done.stdout + done.stderr


def test_eval_json_prints_one_object_and_quiet_prints_no_progress(model_dir, beir_dir, tmp_path):
    result = runner.invoke(app, [
        "eval", str(beir_dir), "--strategy", "all", "--model", str(model_dir), "--top-k", "5", "--json",
        "--quiet", "--cache-dir", str(tmp_path / "cache"), "--dtype", "float32",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["strategy"] == "all" and data["queries"] == 4 and data["dtype"] == "float32"
    assert result.stderr == ""


def test_eval_shows_per_query_progress(model_dir, beir_dir, tmp_path):
    result = runner.invoke(app, [
        "eval", str(beir_dir), "--strategy", "all", "--model", str(model_dir), "--top-k", "5",
        "--cache-dir", str(tmp_path / "cache"),
    ])
    assert result.exit_code == 0, result.output
    assert "extracting" in result.stderr and "4/4" in result.stderr


def test_fit_refuses_an_unknown_storage_precision(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"query": "sea", "candidates": [{"id": "a", "text": "the sea"}], "relevance": {"a": 1}}\n')
    result = runner.invoke(app, ["fit", str(log), "--out", str(tmp_path / "r"), "--storage-dtype", "float64"])
    assert result.exit_code == 2, result.output
    assert "storage_dtype must be one of" in result.output and "'float64'" in result.output


def test_fit_with_adapter_from_the_command_line(model_dir, tmp_path):
    from tests.unit.test_fit import write_log

    log = write_log(tmp_path / "log.jsonl", count=10)
    router = tmp_path / "router"
    result = runner.invoke(app, ["fit", str(log), "--out", str(router), "--model", str(model_dir), "--layer", "0",
                                 "--epochs", "10", "--cache-dir", str(tmp_path / "cache"), "--lora",
                                 "--lora-rank", "2", "--adapter-lr", "0.01", "--lora-epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "--adapter-lr is deprecated: use --lora-lr" in result.stderr  # the old name still works, with a warning
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "lora_ndcg@10" in summary and "lora_base_ndcg@10" in summary
    config = json.loads((router / "config.json").read_text())
    lora = config["training"]["lora"]
    assert lora["settings"]["ranks"] == [2] and len(lora["runs"][0]["history"]) == 2
    assert lora["settings"]["learning_rates"] == [0.01]


@pytest.mark.parametrize("flags, message", [
    (["--adapter-rank", "0"], "ranks"),
    (["--adapter-lr", "3"], "learning rates"),
    (["--adapter-train-queries", "-1"], "--lora-train-queries -1"),
    (["--lora-scope", "passages"], "scope"),
])
def test_fit_refuses_bad_adapter_settings_before_loading(monkeypatch, tmp_path, flags, message):
    no_model_loads(monkeypatch)
    log = tmp_path / "log.jsonl"
    log.write_text('{"query": "sea", "candidates": [{"id": "a", "text": "the sea"}], "relevance": {"a": 1}}\n')
    result = runner.invoke(app, ["fit", str(log), "--out", str(tmp_path / "r"), "--adapter", *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output
