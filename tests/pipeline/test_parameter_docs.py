"""The pipeline's parameter docs, as the Kubeflow UI shows them (the compiled YAML's descriptions): every JSON
example in them is a real config of its stage, built through the stage registry's config class."""

from __future__ import annotations

import json
import re

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration import stage_parameters, steps
from rlhf_pipeline.stages import STAGES
from tests.pipeline.conftest import compile_spec


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory) -> dict[str, str]:
    spec, _, _ = compile_spec(tmp_path_factory.mktemp("docs"))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: " ".join(p.get("description", "").split()) for name, p in params.items()}  # lines joined


def json_examples(text: str) -> list:
    return [json.loads(m) for m in re.findall(r"\{[^{}]*\}", text)]


def test_every_stage_config_parameter_is_documented_with_an_example(descriptions):
    blobs = sorted(p for p in descriptions if p.endswith("_config"))
    # every registry stage, and the steps that run one under another name (the judge: the reward stage)
    assert blobs == sorted(f"{key}_config" for key in (*STAGES, *steps.STEP_STAGES))
    for name in blobs:
        assert json_examples(descriptions[name]), name


@pytest.mark.parametrize("section", stage_parameters.SECTIONS)
def test_config_examples_build_the_real_stage_config(descriptions, section):
    config_cls = steps.stage_config_class(section)
    examples = json_examples(descriptions[f"{section}_config"])
    assert examples
    for example in examples:
        cfg = steps.build_config(config_cls, example, **stage_parameters.PLACEHOLDERS)  # what the step does
        assert {key: getattr(cfg, key) for key in example} == example
        stage_parameters.check_stage_options({section: example})  # and the validate-config step accepts it


def test_a_bad_example_would_fail_the_check():
    """The check above can fail: the example this issue found in the docs (`max_seq_length`) is refused."""
    with pytest.raises(UserError, match="unknown option --max-seq-length"):
        steps.build_config(steps.stage_config_class("sft"), {"max_seq_length": 1024}, **stage_parameters.PLACEHOLDERS)


def test_every_typed_parameter_is_documented_with_the_key_it_overrides(descriptions):
    for param in stage_parameters.TYPED_PARAMETERS:
        text = descriptions[param.name]
        assert f'{param.blob}\'s "{param.key}"' in text, param.name
