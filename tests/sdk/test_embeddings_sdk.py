"""`client.embeddings.create` against cascade: fallback to the same model on another
provider, Gemini's batch format, base64, and the stored rows."""

import base64
import json
import sqlite3
import struct
import time

import openai
import pytest


def test_fallback_to_the_same_model_on_another_provider(gw, client, schemas):
    gw.knobs("te3", "status=503")
    raw = client.embeddings.with_raw_response.create(model="emb", input=["one", "two"], encoding_format="float")
    r = raw.parse()
    assert raw.headers["x-cascade-model"] == "emb-azure"
    assert raw.headers["x-cascade-fallbacks"] == "1"
    assert [d.index for d in r.data] == [0, 1] and all(len(d.embedding) == 8 for d in r.data)
    assert r.usage.prompt_tokens > 0
    schemas("CreateEmbeddingResponse", json.loads(raw.http_response.text))
    assert gw.calls("te3") == 1 and gw.calls("te3-deploy") == 1
    assert gw.bodies("te3-deploy")[-1]["input"] == ["one", "two"]


def test_gemini_batch_and_base64(gw, client, schemas):
    raw = client.embeddings.with_raw_response.create(model="emb_gemini", input="hello", encoding_format="base64")
    body = json.loads(raw.http_response.text)
    vec = struct.unpack("<8f", base64.b64decode(body["data"][0]["embedding"]))
    assert len(vec) == 8
    sent = gw.bodies("gem-emb")[-1]
    assert sent["requests"][0]["content"]["parts"][0]["text"] == "hello"
    # The SDK asks for base64 by default and decodes it itself.
    r = client.embeddings.create(model="emb_gemini", input=["a", "b", "c"])
    assert len(r.data) == 3 and r.usage.total_tokens > 0
    assert all(len(d.embedding) == 8 for d in r.data)
    raw = client.embeddings.with_raw_response.create(model="emb_gemini", input="x", encoding_format="float")
    schemas("CreateEmbeddingResponse", json.loads(raw.http_response.text))


def test_dimensions_that_do_not_match_fall_back(gw, client):
    gw.knobs("te3", "dims=4")
    raw = client.embeddings.with_raw_response.create(model="emb", input="x")
    assert raw.headers["x-cascade-model"] == "emb-azure"
    assert "invalid_output" in raw.headers["x-cascade-trace"] or "emb-openai" in raw.headers["x-cascade-trace"]


def test_wrong_chain_kind_is_a_400(gw, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="main", input="x")
    assert "main" in err.value.message and "embedding" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "x"}])
    assert "/v1/embeddings" in err.value.message


def test_rows_are_stored_with_tokens_and_gemini_without(gw, client):
    r1 = client.embeddings.with_raw_response.create(model="emb", input="stored")
    r2 = client.embeddings.with_raw_response.create(model="emb_gemini", input="stored")
    ids = [r1.headers["x-request-id"], r2.headers["x-request-id"]]
    deadline = time.time() + 5
    while True:
        con = sqlite3.connect(gw.db)
        rows = con.execute(
            "SELECT request_id, surface, input_tokens, cost_usd FROM requests WHERE request_id IN (?, ?)", ids
        ).fetchall()
        con.close()
        if len(rows) == 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    by_id = {r[0]: r for r in rows}
    assert by_id[ids[0]][1] == "embeddings" and by_id[ids[0]][2] > 0 and by_id[ids[0]][3] > 0
    assert by_id[ids[1]][2] is None
