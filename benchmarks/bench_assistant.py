"""What the assistant layer adds to a reply's latency, apart from the language model.

Two measurements:
1. The speakable filter and the piece cutter per delta: a markdown-laden reply of ~1000
   characters fed a token (a word) at a time, timed in-process: microseconds per delta for the
   filter alone and with the piece cutter (`PieceCutter`, what `Turn` does per delta).
2. First token -> first piece over real HTTP: `Assistant.turn` against the stand-in model server
   (`fastcsm.testing_llm`) at `--tokens-per-s`, through the `openai` SDK. The floor is the model's
   own time to write the first sentence after its first token: (its tokens - 1) / rate (a
   stand-in token carries the space after a word, so a sentence is known complete with its
   last token). The gap above the floor is fastcsm's, with the HTTP, SSE and SDK parsing of each
   token and the stand-in's own timer jitter (it runs in a thread of this process): an upper bound.

    python benchmarks/bench_assistant.py [--tokens-per-s 50] [--turns 20]

Prints a table and, last, one line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from fastcsm.assistant import Assistant, LanguageModel, LLMConfig, PieceCutter, Speakable
from fastcsm.testing_llm import StandInLLM, tokens

REPLY = ("**Sure**, here is what I found. *smiles* The best time to visit is in spring, when the weather "
         "is mild and the crowds are small.\n\n## Highlights\n- The old town, with its [narrow streets]"
         "(https://example.com/old-town) and markets 🎉\n- A boat trip on the river (about two hours)\n"
         "- The museum of modern art, closed on Mondays\n\n| Month | Weather |\n|---|---|\n| April | mild |\n"
         "| May | warm |\n\n```python\nprint('not spoken')\n```\nIf you like, I can suggest a few restaurants "
         "near the river too, or help you plan the days. (laughs) Just let me know what you enjoy most! ")
FIRST_SENTENCE_TOKENS = len(tokens("**Sure**, here is what I found. "))


def per_delta(repeats: int) -> dict:
    deltas = tokens(REPLY)
    filt, cut = [], []
    for _ in range(repeats):
        f = Speakable(max_chars=2000)
        t0 = time.perf_counter()
        for d in deltas:
            f.feed(d)
        f.finish()
        filt.append((time.perf_counter() - t0) / len(deltas))
        f = Speakable(max_chars=2000)
        cutter = PieceCutter(f)
        t0 = time.perf_counter()
        for d in deltas:
            cutter.update(f.feed(d), final=False)
        cutter.update(f.finish(), final=True)
        cut.append((time.perf_counter() - t0) / len(deltas))
    return {"deltas": len(deltas), "chars": len(REPLY), "filter_us_per_delta": statistics.median(filt) * 1e6,
            "filter_and_pieces_us_per_delta": statistics.median(cut) * 1e6}


async def first_piece(server: StandInLLM, turns: int) -> list[dict]:
    model = LanguageModel(LLMConfig(server.url, "stand-in"))
    assistant = Assistant(model)
    out = []
    for i in range(turns + 1):  # the first turn opens the connection: not counted
        turn = assistant.turn(f"question {i}")
        async for _ in turn:
            break
        row = {"request_to_first_token_ms": (turn.first_token_at - turn.started_at) * 1e3,
               "first_token_to_first_piece_ms": (turn.first_piece_at - turn.first_token_at) * 1e3}
        await turn.cancel()
        turn.finish()
        assistant.history.clear()
        if i:
            out.append(row)
    await model.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens-per-s", type=float, default=50.0)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cost = per_delta(args.repeats)
    with StandInLLM([REPLY], tokens_per_s=args.tokens_per_s) as server:
        rows = asyncio.run(first_piece(server, args.turns))
    gaps = sorted(r["first_token_to_first_piece_ms"] for r in rows)
    ttft = sorted(r["request_to_first_token_ms"] for r in rows)
    floor_ms = (FIRST_SENTENCE_TOKENS - 1) * 1e3 / args.tokens_per_s
    p = {"p50": gaps[len(gaps) // 2], "p90": gaps[int(len(gaps) * 0.9)]}
    print(f"reply: {cost['chars']} chars in {cost['deltas']} deltas")
    print(f"speakable filter            {cost['filter_us_per_delta']:8.1f} us a delta")
    print(f"filter + piece cutting      {cost['filter_and_pieces_us_per_delta']:8.1f} us a delta")
    print(f"request -> first token      p50 {ttft[len(ttft) // 2]:7.2f} ms (stand-in sends it at once)")
    print(f"first token -> first piece  p50 {p['p50']:7.2f} ms, p90 {p['p90']:7.2f} ms at {args.tokens_per_s:g} "
          f"tokens/s; the model's own floor {floor_ms:.2f} ms, fastcsm's share p50 {p['p50'] - floor_ms:.2f} ms")
    print(json.dumps({**cost, "tokens_per_s": args.tokens_per_s, "turns": len(rows),
                      "request_to_first_token_ms_p50": ttft[len(ttft) // 2],
                      "first_token_to_first_piece_ms": p, "model_floor_ms": floor_ms,
                      "fastcsm_share_ms_p50": p["p50"] - floor_ms}))


if __name__ == "__main__":
    main()
