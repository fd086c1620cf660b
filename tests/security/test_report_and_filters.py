"""Data text cannot inject HTML or links into report.md (checked by rendering it with a real CommonMark renderer,
markdown-it-py), and MLflow filters built from user-supplied names stay the query they were meant to be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from markdown_it import MarkdownIt

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.evaluation.markdown_safe import inline

EVIL_QUESTION = "Best hops? <script>alert('q')</script> [click](javascript:alert(1)) ![x](javascript:alert(2))"
EVIL_ANSWER = "Try <img src=x onerror=alert(3)> or <javascript:alert(4)> \\[esc\\](javascript:alert(5))"


def rendered(md: str) -> str:
    return MarkdownIt("commonmark").render(md)


def assert_inert(page: str) -> None:
    # the report's own figure is the one image allowed; any other <img> came from the data
    low = page.lower().replace('<img src="frontier.png" alt="kl frontier" />', "")
    for active in ("<script", "<img", 'href="javascript', 'src="javascript', "<b>"):
        assert active not in low, active


def test_unescaped_data_would_be_active():
    """The check above can fail: the raw text renders a script, an image and javascript: links."""
    for text in (EVIL_QUESTION, EVIL_ANSWER):
        with pytest.raises(AssertionError):
            assert_inert(rendered(text))


def test_inline_escapes_exactly_the_active_characters():
    assert inline("<b>[a](b)</b> \\ ok") == "\\<b\\>\\[a\\](b)\\</b\\> \\\\ ok"
    assert inline("plain text, 3 * 4 = 12") == "plain text, 3 * 4 = 12"


def test_inline_text_renders_as_the_same_words():
    """Escaped, the text still reads as written: CommonMark shows the characters, it does not act on them."""
    page = rendered(inline(EVIL_QUESTION))
    assert_inert(page)
    assert "&lt;script&gt;alert('q')&lt;/script&gt;" in page and "[click](javascript:alert(1))" in page


def test_evaluation_report_is_inert():
    from rlhf_pipeline.evaluation.report import report_markdown

    cfg = SimpleNamespace(do_sample=False, max_new_tokens=8, samples_in_report=1)
    md = report_markdown(
        {
            "sft": {
                "reward_mean": 0.0,
                "win_rate": 0.5,
                "kl": 0.0,
                "kl_low": 0.0,
                "kl_high": 0.0,
                "response_length": 3.0,
            }
        },
        [EVIL_QUESTION],
        {"sft": {"responses": [EVIL_ANSWER], "scores": [0.1]}},
        cfg,
        None,
    )
    assert_inert(rendered(md))
    assert "alert('q')" in md  # the text is kept, only made inert


def test_run_report_is_inert():
    from rlhf_pipeline.orchestration.report import render_markdown

    md = render_markdown(
        title="Run",
        alignment="dpo",
        metrics={},
        versions=[],
        generations=[{"question": EVIL_QUESTION, "answers": [{"model": "<b>m</b>", "response": EVIL_ANSWER}]}],
    )
    assert_inert(rendered(md))


# ----------------------------------------------------------------------------------------------------------
# MLflow filters
# ----------------------------------------------------------------------------------------------------------


def test_filter_quotes_each_value_with_the_quote_it_lacks():
    from rlhf_pipeline.orchestration.mlflow_filter import equals

    assert equals({"name": "rlhf-sft", "tags.kfp_run_id": "r1"}) == "name = 'rlhf-sft' and tags.kfp_run_id = 'r1'"
    assert equals({"name": "team's-sft"}) == 'name = "team\'s-sft"'
    with pytest.raises(UserError, match="both quote characters"):
        equals({"name": "a'b\"c"})
    with pytest.raises(ValueError):
        equals({"name = 'x' or name": "y"})  # keys are code, never data


def test_filters_find_exactly_the_named_version(mlflow_sqlite):
    """Against a real MLflow store: a quote in the prefix still finds its version, and an injection attempt
    finds nothing instead of every model."""
    from mlflow import MlflowClient

    from rlhf_pipeline.orchestration.report import find_version

    client = MlflowClient(tracking_uri=mlflow_sqlite, registry_uri=mlflow_sqlite)
    for name in ("team's-sft", "other-sft"):
        client.create_registered_model(name)
        run = client.create_run(client.create_experiment(f"e-{len(name)}"))
        client.create_model_version(name, "file:///tmp/m", run_id=run.info.run_id, tags={"kfp_run_id": "run-1"})
    assert find_version(client, "team's-sft", kfp_run_id="run-1").name == "team's-sft"
    assert find_version(client, "x' or name != '", kfp_run_id="run-1") is None
    assert find_version(client, "other-sft", kfp_run_id="run-1' or tags.kfp_run_id != '") is None
