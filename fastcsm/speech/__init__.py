"""The speech layer: from a line of text in a conversation to the pieces the engine speaks.

- `speech.py`: `SpeakOptions` (every speaking option with its default and limits), the records a
  spoken line returns, and `AudioStream`, which gathers the engine's frames into chunks;
- `line.py`: the line driver, the loop every way of speaking runs: the next piece to submit,
  what was spoken, the audio carried from piece to piece;
- `conversation.py`: a conversation's state (turns, pinned voices, the lines spoken into it);
- `planner.py`: a line cut into pieces, each planned after what was already said, with the
  window kept;
- `text.py`, `normalize.py`, `lexicon.py`: splitting text, reading numbers and symbols as words,
  and a user's pronunciations;
- `timestamps.py`: when each word is heard;
- `voices.py`: the voice store (a sample and its transcript, kept on disk);
- `watermark.py`: the optional audio watermark of Sesame's reference.

It imports the engine, codec and model layers: never the server or an integration.
"""
