"""The official `openai` Python client against a running tessera.

scripts/test starts two servers on the default model and passes their addresses:
  TESSERA_URL       with --api-key $TESSERA_TEST_API_KEY
  TESSERA_URL_TINY  with --max-num-seqs 1 --max-queued-requests 1 (to see 429s)
"""

import os
import threading

import openai
import pytest

URL = os.environ["TESSERA_URL"]
URL_TINY = os.environ["TESSERA_URL_TINY"]
KEY = os.environ["TESSERA_TEST_API_KEY"]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert models, "no models listed"
    return models[0].id


def test_models_lists_the_base_model_first(client, model):
    assert model == "SmolLM2-135M-Instruct.Q4_1", model
    assert client.models.list().data[0].id == model


def test_completion_greedy_is_the_reference_continuation(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() != ""
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_chat_answers_the_fixture_question(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32, temperature=0
    )
    # The reference output of the fixtures for this prompt.
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37
    assert r.usage.completion_tokens == 8


def test_chat_stream_with_usage(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    assert content[0].token == "The"
    assert abs(content[0].logprob - (-1.8827)) < 1e-3
    assert len(content[0].top_logprobs) == 3


def test_bad_request_error(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=4, temperature=-1)
    assert "temperature" in str(e.value)


def test_not_found_error(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=4)


def test_authentication_error(model):
    bad = openai.OpenAI(base_url=f"{URL}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=model, prompt="x", max_tokens=4)


def test_rate_limit_error_when_the_queue_is_full():
    tiny = openai.OpenAI(base_url=f"{URL_TINY}/v1", api_key="unused", max_retries=0)
    name = tiny.models.list().data[0].id
    errors, lock = [], threading.Lock()

    def one():
        try:
            tiny.completions.create(model=name, prompt="Once upon a time", max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
        except openai.RateLimitError as e:
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors, "8 concurrent requests against 1 slot and a queue of 1 should see a 429"
