"""Every ``routehead-rag`` command line of the README and docs/ runs as written.

The command lines run for real, in order (README first, then docs/; ``select-heads`` writes the heads
file a later line reads, ``fit`` the router), in a scratch folder laid out like a checkout
(``../shared/data`` resolves, the query log and the ``--queries`` file the lines name exist); ``eval``,
``select-heads`` and ``fit`` get ``--max-queries 2`` added, nothing else. Every flag of every line is also
parsed without running anything in tests/unit/test_readme_commands.py.

The README's Python examples do not run here, in the test environment: ``.ci/run`` runs each in a fresh
environment holding exactly what its own install block installs.
"""

import json

import pytest
from typer.testing import CliRunner

from routehead_rag.cli import app
from tests.readme import cli_lines

pytestmark = pytest.mark.integration

CAPPED = {"eval", "select-heads", "fit"}  # long on a full set: capped at two queries per source


@pytest.fixture
def checkout_like(tmp_path, data_dir, monkeypatch):
    """``work/`` with ``../shared/data`` beside it, and the query log the README's ``fit`` line names."""
    from routehead_rag.eval.harness import prepare_set

    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir, target_is_directory=True)
    eval_set = prepare_set("trec-dl-2019", max_queries=3, top_k=10, data_dir=data_dir)
    with (work / "my-query-log.jsonl").open("w", encoding="utf-8") as log:
        for qid in eval_set.qids:
            ids = eval_set.candidates[qid].doc_ids
            relevance = {d: g for d, g in eval_set.dataset.qrels[qid].items() if d in ids}
            log.write(json.dumps({"id": qid, "query": eval_set.dataset.queries[qid], "relevance": relevance,
                                  "candidates": [{"id": d, "text": t} for d, t in eval_set.documents(qid)]}))
            log.write("\n")
    queries = [{"query": "What causes the ocean tides?", "documents": ["Stocks fell.", "The Moon pulls the oceans."]},
               {"query": "How many players are on a basketball team?", "documents": [
                   {"id": "b", "text": "Basketball is played by two teams of five players.", "meta": {"topic": "sport"}},
                   {"id": "s", "text": "The stock market fell sharply on Monday."}]}]
    (work / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.setenv("ROUTEHEAD_DATA", str(data_dir))
    return work


def test_readme_command_lines_run_in_order(checkout_like):
    runner = CliRunner()
    ran = []
    for argv in cli_lines():
        argv = [*argv, "--max-queries", "2"] if argv[0] in CAPPED else list(argv)
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, f"routehead-rag {' '.join(argv)}:\n{result.output}"
        ran.append(argv[0])
    assert {"rerank", "eval", "select-heads", "fit", "install-model"} <= set(ran)
    assert (checkout_like / "heads.json").is_file() and (checkout_like / "my-router" / "config.json").is_file()
    assert json.loads((checkout_like / "icr.json").read_text())["strategy"] == "all"
