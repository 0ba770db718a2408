"""Property-based tests (hypothesis): record validation and config loading never crash on any input.

Whatever a user feeds them, `validate_record` returns a list of reasons (never raises) and accepts exactly
what `EditRecord.from_raw` can build; `parse_config` returns a `Config` or raises `ConfigError` naming every
problem with a dotted path, and never any other exception.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odedit.config import Config, ConfigError
from odedit.configlib import to_dict
from odedit.loading import parse_config
from odedit.records import EditRecord, validate_record

KEYS = [
    "id",
    "src",
    "alt",
    "prompt",
    "target",
    "pred",
    "rephrase",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
    "hard_images",
    "hard_answers",
    "task",
    "split",
    "extra",
    "weird",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.sampled_from(["", " ", "../x.png", "/abs.png", "a/b.png", "vqa", "caption", "test", "\udc80"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
records = st.dictionaries(st.sampled_from(KEYS), values, max_size=12) | values


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_validate_record_never_raises_and_agrees_with_from_raw(raw):
    reasons = validate_record(raw)
    assert isinstance(reasons, list) and all(isinstance(r, str) and ": " in r for r in reasons)
    if not reasons:
        rec = EditRecord.from_raw(raw)
        assert rec.prompt.strip() and rec.target.strip()


SECTIONS = {
    "stream": ["batch_size", "mode", "num_edits", "eval_every", "nope"],
    "odedit": ["w_loc", "penalty", "dual_lr", "environments", "mmd_kernels", "enabled"],
    "method": ["name", "lr", "layers", "rank", "n_iter", "optimizer"],
    "model": ["family", "dtype", "pooling", "prompt_template"],
    "resources": ["num_workers", "zero_stage", "cpus_per_worker"],
    "bogus": ["x"],
}
cfg_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 50),
    st.floats(-1e3, 1e3),
    st.just(float("nan")),
    st.just(float("inf")),
    st.text(max_size=12),
    st.lists(st.integers(-2, 5), max_size=3),
    st.sampled_from(
        [
            "lora",
            "ft",
            "grace",
            "single",
            "sequential",
            "learned",
            "off",
            "llava",
            "1e-3",
            "{}",
            "in",
            "bfloat16",
            "last",
        ]
    ),
)
configs = st.dictionaries(st.sampled_from(list(SECTIONS)), st.none(), max_size=4).flatmap(
    lambda secs: st.fixed_dictionaries(
        {s: st.dictionaries(st.sampled_from(SECTIONS[s]), cfg_values, max_size=4) for s in secs}
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs | st.dictionaries(st.text(max_size=6), cfg_values, max_size=3))
def test_parse_config_returns_a_config_or_reports_every_problem(data):
    try:
        cfg = parse_config(data)
    except ConfigError as err:
        assert err.issues, "a ConfigError always lists its problems"
        for issue in err.issues:
            assert isinstance(issue.path, str) and issue.problem
        return
    assert isinstance(cfg, Config)
    assert parse_config(to_dict(cfg)) == cfg


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=25), max_size=4))
def test_overrides_never_crash(overrides):
    try:
        parse_config({}, overrides)
    except ConfigError as err:
        assert err.issues
