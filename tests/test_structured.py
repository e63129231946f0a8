"""JSON extraction from replies of every shape."""

from pydantic import BaseModel

from synth.structured import extract_json, parse_model


class Verdict(BaseModel):
    winner: str
    score: int


def test_extracts_json_from_every_common_shape():
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure! ```json\n{"a": 2}\n``` hope it helps') == {"a": 2}
    assert extract_json('The answer is {"a": 3} as requested.') == {"a": 3}
    assert extract_json('list: [1, 2] done') == [1, 2]


def test_parse_model_says_why_it_failed():
    ok, why = parse_model('{"winner": "A", "score": 7}', Verdict)
    assert ok == Verdict(winner="A", score=7) and why is None
    none, why = parse_model("I cannot help with that.", Verdict)
    assert none is None and why == "no JSON found in the reply"
    none, why = parse_model('{"winner": "A"}', Verdict)
    assert none is None and "field 'score': Field required" in why
    none, why = parse_model('{"winner": "A", "score": ', Verdict)  # truncated
    assert none is None and why == "no JSON found in the reply"
