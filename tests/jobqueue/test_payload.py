"""The job payload: schema, per-field violations that never echo the payload, the allow-list."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqshare.jobqueue.executor import JOB_FUNCTION, check_allowed, decode_job
from seqshare.jobqueue.payload import JobPayload, parse_payload
from seqshare.worker.errors import InvalidJobError, JobNotAllowedError

SECRET = "TOPSECRET-7f3a"


def good(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "smol",
        "context": "The lease of unit 4 ends in March.",
        "questions": [{"custom_id": "q1", "text": "When does the lease end?"}],
        "params": {"max_new_tokens": 32},
    }
    return base | over


def test_valid_payload_round_trips_through_json() -> None:
    p = parse_payload(good(cache_salt="tenant-a", priority="high"))
    again = parse_payload(json.dumps(p.to_json()))
    assert again == p
    assert p.params.max_new_tokens == 32 and p.priority == "high"


def test_chat_context_and_per_question_params() -> None:
    p = parse_payload(good(context=[{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "DOC"}],
                           questions=[{"custom_id": "a", "text": "x", "params": {"mode": "sample", "seed": 3}},
                                      {"custom_id": "b", "text": "y"}]))
    assert p.params_for(p.questions[0]).mode == "sample"
    assert p.params_for(p.questions[1]).max_new_tokens == 32


@pytest.mark.parametrize("payload, where", [
    (good(extra_field=SECRET), "extra_field"),
    (good(questions=[]), "questions"),
    (good(questions=[{"custom_id": "q 1", "text": SECRET}]), "questions[0].custom_id"),
    (good(questions=[{"custom_id": "q1", "text": SECRET}, {"custom_id": "q1", "text": "b"}]),
     "questions[1].custom_id"),
    (good(params={"max_new_tokens": 0, "temperature": SECRET}), "params.max_new_tokens"),
    (good(params={"temperature": SECRET}), "params.temperature"),
    (good(context=[{"role": "user", "content": SECRET}, {"role": "assistant", "content": "x"}]), "context"),
    (good(context=[{"role": "hacker", "content": SECRET}]), "context"),
    (good(priority=SECRET), "priority"),
    (good(model=SECRET + " ; rm -rf"), "model"),
    (good(cache_salt=""), "cache_salt"),
])
def test_each_violation_names_its_field_and_never_echoes_the_payload(payload: dict[str, Any],
                                                                      where: str) -> None:
    with pytest.raises(InvalidJobError) as ei:
        parse_payload(payload)
    text = str(ei.value)
    assert any(p.startswith(where) for p in ei.value.problems), ei.value.problems
    assert SECRET not in text


def test_several_violations_are_all_reported() -> None:
    with pytest.raises(InvalidJobError) as ei:
        parse_payload(good(priority="urgent", params={"top_p": 2.0}, bogus=1))
    fields = {p.split(":")[0] for p in ei.value.problems}
    assert {"priority", "params.top_p", "bogus"} <= fields


def test_context_key_separates_model_salt_and_text() -> None:
    base = parse_payload(good())
    assert base.context_key() == parse_payload(good(questions=[{"custom_id": "z", "text": "other"}])).context_key()
    for other in (good(model="other"), good(cache_salt="t2"), good(context="The lease ends in May.")):
        assert parse_payload(other).context_key() != base.context_key()


def test_allow_list_compares_names_without_importing() -> None:
    check_allowed(JOB_FUNCTION)
    for name in ("os.system", "seqshare.jobqueue.executor.install", None, 42, JOB_FUNCTION + "x"):
        with pytest.raises(JobNotAllowedError):
            check_allowed(name)
    assert decode_job(JOB_FUNCTION, [good()], {}).model == "smol"
    with pytest.raises(InvalidJobError):
        decode_job(JOB_FUNCTION, [good(), good()], {})
    with pytest.raises(InvalidJobError):
        decode_job(JOB_FUNCTION, [], {"payload": good()})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["model", "context", "questions", "params", "cache_salt", "priority",
                               "version", "custom_id", "text", SECRET])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=7))
def test_fuzz_arbitrary_json_is_accepted_or_refused_by_name(data: dict[str, Any]) -> None:
    """Whatever arrives, the parser either returns a payload or raises InvalidJobError, never another
    exception, and a refusal never contains a string value from the input."""
    try:
        p = parse_payload(data)
    except InvalidJobError as e:
        assert e.problems
        assert SECRET not in str(e) or SECRET in _keys(data)
        for s in _strings(data):
            if len(s) >= 8 and s not in _keys(data):
                assert s not in str(e)
        return
    assert isinstance(p, JobPayload) and p.questions


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_raw_bytes_are_refused_by_name(raw: bytes) -> None:
    with contextlib.suppress(InvalidJobError):  # any other exception fails the test
        parse_payload(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                        max_size=12), min_size=1, max_size=8),
       st.text(min_size=1, max_size=200))
def test_fuzz_valid_shapes_parse_and_duplicates_are_refused(ids: list[str], doc: str) -> None:
    payload = {"context": doc, "questions": [{"custom_id": i, "text": "q?"} for i in ids]}
    if len(set(ids)) == len(ids):
        assert len(parse_payload(payload).questions) == len(ids)
    else:
        with pytest.raises(InvalidJobError, match="repeats"):
            parse_payload(payload)


def _strings(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


def _keys(x: Any) -> str:
    if isinstance(x, dict):
        return " ".join(str(k) + " " + _keys(v) for k, v in x.items())
    if isinstance(x, list):
        return " ".join(_keys(v) for v in x)
    return ""
