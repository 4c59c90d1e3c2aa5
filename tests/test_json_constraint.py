"""Answers constrained to JSON (tinyvlm/json_constraint.py): the recognizer against the `json` module and the
`jsonschema` library, then 100% of generated answers parsing and validating, on the tiny random checkpoint and on
SmolLM2-135M's real weights, for free JSON and for a schema with an enum and an array."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyvlm
from tests.conftest import smollm2_path
from tinyvlm.errors import PromptError
from tinyvlm.json_constraint import finish
from tinyvlm.json_grammar import compile_schema, done, feed, response_schema, start

BACKEND_FREE = True  # the models run on the default backend
SCHEMA = {"type": "object", "properties": {
    "animal": {"enum": ["fish", "whale", "crab"]},
    "colours": {"type": "array", "items": {"type": "string"}},
    "legs": {"type": "integer"},
    "note": {"type": "string"},
    "size": {"type": "number"},
    "real": {"type": "boolean"}}, "required": ["animal", "colours", "legs"]}
FORMATS = {"free": ({"type": "json_object"}, {"type": "object"}),
           "schema": ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, SCHEMA)}


def accepts(root: tuple, text: str) -> bool:
    state = feed(start(root), text.encode())
    return state is not None and done(state)


@pytest.mark.parametrize("text, ok", [
    ('{}', True), (' {"a": 1, "b": [true, null, "x\\"y", -1.5e3, {}]}', True), ('{"a": "\\u00e9"}', True),
    ('{"a":}', False), ('{"a" 1}', False), ('[1]', False), ('{"a": 01}', False), ('{"a": 1}x', False),
    ('{"a": 1,}', False), ('{"a": "\x01"}', False), ('{"a":     1}', False),  # 5 spaces: over the limit of 3
])
def test_free_json(text, ok):
    root = response_schema({"type": "json_object"})
    assert accepts(root, text) == ok
    if ok:
        json.loads(text)


@pytest.mark.parametrize("text, ok", [
    ('{"animal": "crab", "colours": ["a", "b"], "legs": 8}', True),
    ('{"animal": "crab", "colours": [], "legs": 8, "note": "x", "size": 1.5, "real": false}', True),
    ('{"animal": "crab", "colours": [], "legs": 8, "real": true}', True),  # optional ones may be left out
    ('{"animal": "squid", "colours": [], "legs": 8}', False),  # not in the enum
    ('{"colours": [], "animal": "crab", "legs": 8}', False),  # properties come in their order
    ('{"animal": "crab", "colours": [], "legs": 8.5}', False),  # an integer
    ('{"animal": "crab", "colours": [1], "legs": 8}', False),  # strings
    ('{"animal": "crab", "colours": []}', False),  # legs is required
    ('{"animal": "crab", "colours": [], "legs": 8, "extra": 1}', False),
])
def test_schema(text, ok):
    assert accepts(response_schema(FORMATS["schema"][0]), text) == ok
    if ok:
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("schema, says", [
    ({"type": "string", "pattern": "a+"}, "the schema keyword 'pattern' is not supported"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 2}, "'minItems' is not supported"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "schema.a: type must be one of"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required a list of its keys"),
    ({"type": "string"}, "the top level must be an object or an array"),
])
def test_unsupported_schemas_are_refused(schema, says):
    with pytest.raises(PromptError, match=says):
        response_schema({"type": "json_schema", "json_schema": {"schema": schema}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), json_values, max_size=4), cut=st.floats(0, 1),
       compact=st.booleans())
def test_every_prefix_of_json_is_accepted_and_finish_completes_it(value, cut, compact):
    text = json.dumps(value, separators=(",", ":") if compact else (", ", ": "))
    root = response_schema({"type": "json_object"})
    assert accepts(root, text)
    prefix = text.encode()[:int(cut * len(text.encode()))]
    state = feed(start(root), prefix)
    assert state is not None
    whole = prefix + finish(state)
    assert done(feed(start(root), whole))
    assert isinstance(json.loads(whole), dict)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_finish_completes_schema_prefixes_into_valid_instances(data):
    instance = {"animal": data.draw(st.sampled_from(["fish", "whale", "crab"])),
                "colours": data.draw(st.lists(st.text(max_size=4), max_size=3)),
                "legs": data.draw(st.integers(-5, 50))}
    if data.draw(st.booleans()):
        instance["real"] = data.draw(st.booleans())
    text = json.dumps(instance).encode()
    root = compile_schema(SCHEMA)
    assert done(feed(start(root), text))  # the instance itself is accepted ...
    cut = data.draw(st.integers(0, len(text)))
    state = feed(start(root), text[:cut])
    assert state is not None
    completed = text[:cut] + finish(state)  # ... and every prefix of it, completed by finish, validates
    assert done(feed(start(root), completed))
    jsonschema.validate(json.loads(completed), SCHEMA)


def check_answers(vlm, prompts, max_tokens: int) -> None:
    for name, (fmt, schema) in FORMATS.items():
        for prompt in prompts:
            for temperature, seed in ((0.0, None), (0.9, 1), (0.9, 2)):
                text = vlm.generate(prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                    response_format=fmt)
                jsonschema.validate(json.loads(text), schema)  # every answer parses and validates


@pytest.mark.torch  # the checkpoint is written through torch
def test_tiny_checkpoint_answers_are_valid_json(checkpoints):
    vlm = tinyvlm.load(checkpoints["text"].path)
    check_answers(vlm, ["Describe a sea animal.", "List three colours."], 32)
    with pytest.raises(PromptError, match="max_new_tokens 3 is too few for a JSON answer"):
        vlm.generate("Hi", max_new_tokens=3, response_format=FORMATS["schema"][0])


def test_smollm2_answers_are_valid_json():
    check_answers(tinyvlm.load(smollm2_path()), ["Describe a sea animal as JSON."], 48)
