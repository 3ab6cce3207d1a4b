"""The real `openai` Python SDK pointed at cascade: answers, fallbacks, fail-fast, and
every payload checked against OpenAI's published schemas."""

import json

import urllib.error
import urllib.request
import openai
import pytest

def http(method, url, body=None):
    """(status, text) of a plain HTTP call, without the SDK."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


def stream_chunks(gw, schemas, model):
    """The chunks of a raw streamed answer (usage included), each checked against the spec."""
    body = {"model": model, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    status, text = http("POST", gw.base + "/v1/chat/completions", body)
    assert status == 200
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        schemas("CreateChatCompletionStreamResponse", c)
    return chunks


def raw_create(client, **kw):
    raw = client.chat.completions.with_raw_response.create(messages=MESSAGES, **kw)
    return raw, raw.parse()


def test_answer_and_schema(gw, client, schemas):
    raw, completion = raw_create(client, model="main")
    assert completion.choices[0].message.content == "Hello from p! This is a mock answer."
    assert completion.model == "p"
    assert raw.headers["x-cascade-model"] == "primary"
    assert raw.headers["x-cascade-provider"] == "mock"
    assert raw.headers["x-cascade-chain"] == "main"
    assert raw.headers["x-cascade-attempts"] == "1"
    assert raw.headers["x-cascade-fallbacks"] == "0"
    assert raw.headers["x-request-id"]
    schemas("CreateChatCompletionResponse", json.loads(raw.http_response.text))


def test_streaming_answer_and_chunk_schema(gw, client, schemas):
    stream = client.chat.completions.create(
        model="main", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Hello from p! This is a mock answer."
    assert usage and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The raw chunks, checked one by one against the spec.
    chunks = stream_chunks(gw, schemas, "main")
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1


@pytest.mark.parametrize("knobs", ["status=500", "status=429,retry_after=1", "empty", "malformed", "reset", "status=401"])
def test_fallback_is_visible_in_headers(gw, client, knobs):
    gw.knobs("p", knobs)
    raw, completion = raw_create(client, model="main")
    assert completion.choices[0].message.content == "Hello from s! This is a mock answer."
    assert completion.model == "s"
    assert raw.headers["x-cascade-model"] == "secondary"
    assert raw.headers["x-cascade-attempts"] == "2"
    assert raw.headers["x-cascade-fallbacks"] == "1"
    assert gw.calls("p") == 1 and gw.calls("s") == 1


def test_fallback_on_timeout(gw, client):
    gw.knobs("slow", "stall")
    raw, completion = raw_create(client, model="timeouts")
    assert raw.headers["x-cascade-model"] == "secondary"
    assert raw.headers["x-cascade-fallbacks"] == "1"
    assert gw.calls("slow") == 1


def test_fallback_when_unreachable(gw, client):
    raw, completion = raw_create(client, model="offline")
    assert raw.headers["x-cascade-model"] == "secondary"
    assert raw.headers["x-cascade-attempts"] == "2"


@pytest.mark.parametrize("knobs", ["status=500", "cut_after=0", "status=429"])
def test_streaming_fallback(gw, client, knobs):
    gw.knobs("p", knobs)
    raw = client.chat.completions.with_raw_response.create(model="main", messages=MESSAGES, stream=True)
    assert raw.headers["x-cascade-model"] == "secondary"
    text = "".join((c.choices[0].delta.content or "") for c in raw.parse() if c.choices)
    assert text == "Hello from s! This is a mock answer."


def test_no_fallback_on_400(gw, client, schemas):
    gw.knobs("p", "status=400")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="main", messages=MESSAGES)
    assert err.value.status_code == 400
    assert gw.calls("p") == 1 and gw.calls("s") == 0
    schemas("ErrorResponse", err.value.response.json())


def test_mid_stream_failure_raises(gw, client):
    gw.knobs("p", "chunks=6,cut_after=2")
    stream = client.chat.completions.create(model="main", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert gw.calls("s") == 0


def test_errors_are_openai_shaped(gw, client, schemas):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    body = err.value.response.json()
    schemas("ErrorResponse", body)
    assert body["error"]["code"] == "model_not_found"

    gw.knobs("p", "status=500")
    gw.knobs("s", "status=503")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="main", messages=MESSAGES)
    assert err.value.status_code == 502
    body = err.value.response.json()
    schemas("ErrorResponse", body)
    assert body["error"]["code"] == "all_targets_failed"
    assert [a["model"] for a in body["error"]["attempts"]] == ["primary", "secondary"]
    assert "SECRET" not in err.value.response.text

    status, text = http("POST", gw.base + "/v1/chat/completions", b"{oops")
    assert status == 400
    schemas("ErrorResponse", json.loads(text))


def test_models_list(gw, client, schemas):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[:3] == ["main", "timeouts", "offline"]
    assert {"primary", "secondary"} <= set(ids)
    schemas("ListModelsResponse", json.loads(http("GET", gw.base + "/v1/models")[1]))


def test_metrics_parse_as_prometheus_text(gw, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="main", messages=MESSAGES)
    text = http("GET", gw.base + "/metrics")[1]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in [
        "cascade_requests",
        "cascade_attempts",
        "cascade_fallbacks",
        "cascade_request_duration_seconds",
        "cascade_upstream_duration_seconds",
        "cascade_overhead_seconds",
        "cascade_inflight_requests",
    ]:
        assert name in families, name
    assert "SECRET" not in text


def test_no_secret_in_logs(gateway):
    gateway.log.seek(0)
    assert b"sk-sdk-test-SECRET" not in gateway.log.read()


def test_streamed_cache_hit_reassembles_like_the_original(gw, client):
    question = [{"role": "user", "content": "cache me (sdk)"}]

    def collect():
        raw = client.chat.completions.with_raw_response.create(
            model="main", messages=question, temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        for chunk in raw.parse():
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return raw.headers["x-cascade-cache"], text, finish, usage

    first = collect()
    second = collect()
    assert first[0] == "miss" and second[0] == "hit"
    assert second[1:] == first[1:]
    assert gw.calls("p") == 1


def stored_request(gw, request_id, timeout=5.0):
    """The `requests` row of a request, once the gateway's writer has committed it."""
    import sqlite3
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        conn = sqlite3.connect(gw.db)
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        conn.close()
        if row is not None:
            return dict(row)
        time.sleep(0.05)
    raise AssertionError(f"no stored row for {request_id}")


def test_a_plain_sdk_stream_has_no_usage_chunk_and_its_tokens_are_stored(gw, client):
    raw = client.chat.completions.with_raw_response.create(model="main", messages=MESSAGES, stream=True)
    chunks = list(raw.parse())
    assert chunks and all(c.usage is None for c in chunks), "the client did not ask for usage"
    assert all(c.choices for c in chunks)
    row = stored_request(gw, raw.headers["x-request-id"])
    assert row["stream"] == 1 and row["status"] == 200 and row["model_name"] == "primary"
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0
    assert row["cost_usd"] == 0  # the test pool has no prices


def test_an_sdk_fallback_is_recorded_with_its_calls(gw, client):
    import sqlite3

    gw.knobs("p", "status=503")
    raw, done = raw_create(client, model="main")
    assert done.model == "s"
    row = stored_request(gw, raw.headers["x-request-id"])
    assert (row["model_name"], row["attempts"], row["fallbacks"]) == ("secondary", 2, 1)
    import time

    deadline = time.time() + 5
    while True:
        conn = sqlite3.connect(gw.db)
        calls = conn.execute(
            "SELECT model_name, kind, success, status, error_type FROM model_calls WHERE request_id = ? ORDER BY id",
            (raw.headers["x-request-id"],),
        ).fetchall()
        conn.close()
        if len(calls) >= 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert calls == [("primary", "primary", 0, 503, "transient"), ("secondary", "fallback", 1, 200, None)]
