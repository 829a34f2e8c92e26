"""The AI node from functions: nanogrid.ai against a server speaking the Ollama API."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import nanogrid
from tests.conftest import start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ai_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with FakeOllama() as ollama:
        grid = start_grid(
            tmp_path_factory.mktemp("ai"), ai_endpoint=ollama.url, ai_model="tiny", stem_cells=1
        )
        yield grid
        grid.stop()


@pytest.fixture()
def client(ai_grid) -> nanogrid.Client:
    return nanogrid.connect(ai_grid.url, api_key=ai_grid.api_key)


@nanogrid.remote(ai=True, timeout=30)
def summarise(text):
    import nanogrid.ai

    return nanogrid.ai.generate(f"Summarise: {text}").response


def test_a_function_calls_the_ai_node_and_its_tokens_are_counted(client):
    job = summarise.spawn("the quick brown fox jumps over the lazy dog")
    assert job.result(timeout=30).startswith("[tiny] summary: Summarise: the quick")
    usage = job.ai_usage
    assert usage["calls"] == 1 and usage["prompt_tokens"] == 10 and usage["completion_tokens"] > 0


def test_a_call_may_choose_its_model(client):
    assert summarise.with_options(model="summarizer").remote("text").startswith("[summarizer]")
    assert summarise.remote("text").startswith("[tiny]")  # the grid's default again


def test_chat_and_streaming(client):
    @nanogrid.remote(ai=True, timeout=30)
    def converse():
        import nanogrid.ai

        answer = nanogrid.ai.chat([{"role": "user", "content": "hello there"}]).message.content
        streamed = "".join(
            chunk.response for chunk in nanogrid.ai.generate("one two three", stream=True)
        )
        return answer, streamed, nanogrid.ai.usage()

    answer, streamed, usage = converse.remote()
    assert answer.startswith("[tiny] summary: hello there")
    assert streamed.strip().startswith("[tiny] summary: one two three")
    assert usage["calls"] == 2


def test_models_lists_what_the_node_has(client):
    models = client.models()
    assert models["models"] == ["tiny:latest", "summarizer:latest"] and models["default"] == "tiny"


def test_a_grid_without_an_ai_node_says_so(grid):
    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    with pytest.raises(RuntimeError, match="no AI node in this sandbox"):
        summarise.remote("x")
    with pytest.raises(nanogrid.APIError, match="no AI node"):
        client.models()
