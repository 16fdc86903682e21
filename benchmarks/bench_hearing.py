"""How well pocketsphinx hears a turn decoded live against decoded whole, turn for turn.

A `Listener` with live transcription (`live=True`, what `--transcribe-live` gives a server) is fed
sentences spoken by espeak-ng (tests/listen_audio.py), one after the other with a second of
silence between them, as a microphone stream. At each pause it hears the turn both ways: the
live transcript (decoded as the audio came, from the cepstral mean of the stream's last turn)
and a whole decode of the same audio (the recording's own mean). The stream's first turn has no
live transcript (nothing to start from) and is not counted. Reports, for each way, the turns
heard exactly right and the share of the words heard (order-free). The audio is fed as fast as
it is read: what is heard does not depend on the pace (the live decoder is fed the same pieces),
and `bench_loop.py --spoken` measures the time.

    python benchmarks/bench_hearing.py [--rounds 2]

Prints the turns the two ways heard differently, a summary, and one line of JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from listen_audio import SENTENCES, overlap, pcm16, silence, spoken  # noqa: E402

from fastcsm.listen.asr import SphinxTranscriber  # noqa: E402
from fastcsm.listen.listener import Listener, SpeechPaused  # noqa: E402
from fastcsm.listen.vad import SileroVad  # noqa: E402

MORE = ("can you tell me a joke", "please turn off the lights", "how are you doing", "good morning to you",
        "where is the nearest station", "i need to book a flight", "play some music please", "what is your name",
        "it is going to rain this afternoon", "could you speak a little slower", "my favorite color is blue",
        "tell me about the news")
CHUNK = 320  # 20 ms at 16 kHz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="passes over the sentences")
    args = ap.parse_args()
    transcriber = SphinxTranscriber()
    listener = Listener(SileroVad(), 16_000, transcriber=transcriber, live=True, max_ahead_s=None)
    rows = []
    try:
        for text in (SENTENCES + MORE) * args.rounds:
            pcm = pcm16(np.concatenate([silence(0.3), spoken(text), silence(1.0)]))
            for i in range(0, len(pcm), 2 * CHUNK):
                for e in listener.feed(pcm[i: i + 2 * CHUNK]):
                    if not isinstance(e, SpeechPaused):
                        continue
                    live = e.live.result() if e.live is not None else None
                    whole = transcriber.transcribe(e.audio_16k)
                    listener._adapt(live or whole)  # as the turn would, taking the transcript it used
                    if live is not None:
                        rows.append({"said": text, "whole": whole.text, "live": live.text,
                                     "audio_s": len(e.audio_16k) / 16_000})
    finally:
        transcriber.close()
    for r in rows:
        if r["whole"] != r["live"]:
            print(f"{r['said']!r}: whole {r['whole']!r}, live {r['live']!r}")
    summary = {}
    for way in ("whole", "live"):
        summary[way] = {"exact": sum(r[way] == r["said"] for r in rows),
                        "words": round(statistics.mean(overlap(r[way], r["said"]) for r in rows), 3)}
        print(f"{way:>5}: {summary[way]['exact']} of {len(rows)} turns exactly right, "
              f"{summary[way]['words']:.1%} of the words")
    print(json.dumps({"turns": len(rows), "mean_audio_s": round(statistics.mean(r["audio_s"] for r in rows), 2),
                      **summary}))


if __name__ == "__main__":
    main()
