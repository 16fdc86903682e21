"""The same bad value gets the same refusal wherever it is given: the library (`Generator`), the
CLI (`fastcsm speak`), HTTP (`POST /v1/audio/speech`) and the WebSocket (`speak`). Each boundary
may name the field or flag in front of the message (its own wrapping), never reword it."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from server_harness import LiveServer
from websockets.sync.client import connect

from fastcsm.cli import main
from fastcsm.errors import EXIT_USAGE

WINDOW_MS = 2048 * 80  # the tiny model's window, as csm-1b's; the server's limit is set to it below

BAD = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -math.inf), ("temperature", -0.5),
    ("temperature", 10.5),
    ("topk", -1), ("topk", 2049),
    ("max_audio_length_ms", math.nan), ("max_audio_length_ms", math.inf), ("max_audio_length_ms", -5),
    ("max_audio_length_ms", 0), ("max_audio_length_ms", 40), ("max_audio_length_ms", 1e9),
    ("speaker", -1), ("speaker", 1_000_001), ("seed", -1), ("seed", 2**62),
]


@pytest.fixture(scope="module")
def live():
    with LiveServer(max_audio_length_ms=WINDOW_MS) as s:
        yield s


def library(gen, name, value) -> str:
    args = {"speaker": 0, "max_audio_length_ms": 240, name: value}
    with pytest.raises(ValueError) as e:
        gen.generate("Hello.", **args)
    return str(e.value)


def cli(tmp_path, capsys, model, name, value) -> str:
    argv = ["speak", "Hello.", "-o", str(tmp_path / "out.wav"), "--model", str(model), "--device", "cpu", "-q",
            "--voices-dir", str(tmp_path / "voices"), "--max-audio-length-ms", "240",
            f"--{name.replace('_', '-')}={value!r}"]  # (=: a value such as -inf is no option)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE, err
    return err.strip().removeprefix("fastcsm: error: ")


def http(live, name, value) -> str:
    body = json.dumps({"input": "Hello.", "voice": "0", "response_format": "pcm", name: value})
    r = httpx.post(live.url + "/v1/audio/speech", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name
    return error["message"]


def websocket(live, name, value) -> str:
    with connect(live.url.replace("http", "ws") + "/v1/conversations", open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(json.dumps({"type": "speak", "text": "Hello.", name: value}))
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "error", event
        return event["message"]


def unwrapped(message: str, wrappings: tuple[str, ...]) -> str:
    """`message` without the boundary's own prefix (one of `wrappings`)."""
    for w in sorted(wrappings, key=len, reverse=True):
        if message.startswith(w):
            return message[len(w):]
    return message


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_the_same_bad_value_gets_the_same_refusal_everywhere(live, tmp_path, capsys, name, value):
    from server_harness import tiny_checkpoint

    gen = live.service.generator
    said = library(gen, name, value)
    assert said.startswith(name), said
    wrappings = (f"{name}: ", "--" + name.replace("_", "-") + ": ", f"invalid message: {name}: ")
    heard = {"cli": cli(tmp_path, capsys, tiny_checkpoint(), name, value), "http": http(live, name, value),
             "websocket": websocket(live, name, value)}
    for boundary, message in heard.items():
        assert unwrapped(message, wrappings) == said, (boundary, message, said)
    # ... and the refusal disturbed nothing: the same line still speaks, on the server and in the library.
    assert gen.generate_codes("Still here.", 0, max_audio_length_ms=160, seed=0).shape[1] == gen.cfg.num_codebooks
    r = httpx.post(live.url + "/v1/audio/speech", json={"input": "Hi.", "voice": "0", "response_format": "pcm",
                                                       "max_audio_length_ms": 160, "seed": 0}, timeout=60)
    assert r.status_code == 200 and len(r.content) > 0


def test_the_table_is_what_each_boundary_states():
    """The CLI's defaults, the HTTP body's and WebSocket's defaults and schema bounds are the table's."""
    from fastcsm.bounds import MAX_AUDIO_LENGTH_MS, SPEAKER, TEMPERATURE, TOPK, TOPP
    from fastcsm.cli import build_parser
    from fastcsm.engine.sampling import SamplingParams
    from fastcsm.server import protocol as P
    from fastcsm.speech.speech import SpeakOptions

    args = build_parser().parse_args(["speak", "Hi."])
    assert (args.temperature, args.topk) == (TEMPERATURE.default, TOPK.default)
    options, params = SpeakOptions(), SamplingParams()
    assert (options.temperature, options.topk, options.topp, options.max_audio_length_ms) == \
        (TEMPERATURE.default, TOPK.default, TOPP.default, MAX_AUDIO_LENGTH_MS.default)
    assert (params.temperature, params.topk, params.topp) == (TEMPERATURE.default, TOPK.default, TOPP.default)
    speech = P.SpeechRequest.model_json_schema()["properties"]
    assert speech["temperature"]["default"] == TEMPERATURE.default
    assert (speech["temperature"]["minimum"], speech["temperature"]["maximum"]) == (TEMPERATURE.low, TEMPERATURE.high)
    assert (speech["topk"]["default"], speech["topk"]["maximum"]) == (TOPK.default, TOPK.high)
    assert speech["speaker"]["anyOf"][0]["maximum"] == SPEAKER.high
    configure = P.Configure()
    assert (configure.temperature, configure.topk) == (TEMPERATURE.default, TOPK.default)
