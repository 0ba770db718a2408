"""`odedit.loading`'s checks that need the registries: an editor that cannot run under DeepSpeed ZeRO-3 is refused at
load, naming the editor, the stage and a fix (issue 16 item 3)."""

from __future__ import annotations

import pytest

from odedit.config import ConfigError
from odedit.configlib import ConfigIssue
from odedit.loading import load_config


def test_wise_and_unike_under_zero3_are_refused_at_load_with_the_editor_the_stage_and_a_fix(record_outcome):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=wise", "stream.mode=sequential", "resources.zero_stage=3"])
    text = str(err.value)
    assert "resources.zero_stage" in text and "method.name=wise cannot run under DeepSpeed ZeRO-3" in text
    assert "main weight" in text and "use resources.zero_stage=2" in text
    record_outcome(
        "bad config", "method.name=wise with resources.zero_stage=3", "refused at load", text.splitlines()[1]
    )
    with pytest.raises(ConfigError, match="method.name=unike cannot run under DeepSpeed ZeRO-3"):
        load_config(None, ["method.name=unike", "stream.mode=sequential", "resources.zero_stage=3"])


def test_mend_under_zero3_needs_a_trained_hypernetwork(record_outcome):
    """MEND's edit runs under ZeRO-3 (tests/pipeline/train/test_zero_editors.py); its in-process meta-training
    does not, so without method.hypernet_path the combination is refused, naming the file to give."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=mend", "stream.mode=sequential", "resources.zero_stage=3"])
    text = str(err.value)
    assert "method.name=mend cannot run under DeepSpeed ZeRO-3" in text and "method.hypernet_path" in text
    assert "jobs.train_editor" in text
    record_outcome("bad config", "method.name=mend, no hypernet_path, zero_stage=3", "refused at load", text)
    cfg = load_config(
        None,
        ["method.name=mend", "method.hypernet_path=h.safetensors", "stream.mode=sequential", "resources.zero_stage=3"],
    )
    assert cfg.resources.zero_stage == 3


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=wise", "stream.mode=sequential", "resources.zero_stage=2"],
        ["method.name=ft", "stream.mode=sequential", "resources.zero_stage=3"],
        ["method.name=tpatcher", "stream.mode=sequential", "resources.zero_stage=3"],
        ["method.name=unike", "stream.mode=sequential", "resources.zero_stage=2"],
    ],
)
def test_other_editor_stage_combinations_load(overrides):
    assert load_config(None, overrides).resources.zero_stage in (2, 3)


def test_an_extra_checks_issue_refuses_a_config_that_builds():
    """fa82f56 replaced the extra checks' issues with the stage issues once the config built, so every check
    owned by a higher layer (record sources, the search space) was silently dropped."""

    def refuse(raw):
        return [ConfigIssue("data.source", raw.get("data", {}).get("source"), "refused by a higher layer", "fix it")]

    with pytest.raises(ConfigError, match="refused by a higher layer"):
        load_config(None, extra_checks=[refuse])
