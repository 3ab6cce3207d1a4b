"""Other OpenAI endpoints (`files`, `moderations`, ...) reach `server.passthrough`
unchanged, with the provider's key and never the caller's."""

import io
import json

from test_openai_sdk import http


def test_files_upload_reaches_the_provider_with_its_key(gw, client):
    data = b"x" * 300_000
    raw = client.files.with_raw_response.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    echo = json.loads(raw.http_response.text)
    assert echo["path"] == "/v1/files" and echo["bytes"] > len(data)
    assert gw.calls("passthrough") == 1
    h = gw.last_headers()
    assert h["authorization"] == "Bearer sk-sdk-test-SECRET"
    assert "client-key" not in json.dumps(h)
    assert h["content-type"].startswith("multipart/form-data")


def test_moderations_status_query_and_method_are_kept(gw, client):
    raw = client.moderations.with_raw_response.create(input="hello")
    echo = json.loads(raw.http_response.text)
    assert echo["method"] == "POST" and echo["path"] == "/v1/moderations"
    assert echo["authorization"] == "Bearer sk-sdk-test-SECRET"
    status, text = http("GET", gw.base + "/v1/files?limit=2&purpose=batch")
    echo = json.loads(text)
    assert status == 200 and echo["method"] == "GET" and echo["query"] == "limit=2&purpose=batch"
    assert echo["authorization"] == "Bearer sk-sdk-test-SECRET"
