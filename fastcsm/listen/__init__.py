"""Hearing: speech recognition, voice activity, and the listener that turns a stream of microphone
audio into the user's turns.

- `asr.py`: a `Transcriber` (faster-whisper by default, pocketsphinx as the offline fallback) that
  turns 16 kHz mono audio into text with segment and word timings;
- `vad.py`: Silero's voice activity detector and the `TurnDetector` that says where a turn starts
  and stops in streamed audio;
- `listener.py`: the `Listener`, fed 16-bit PCM chunks at any rate, emitting speech-started,
  speech-paused (the turn's audio so far, to transcribe early), speech-stopped and turn events
  with the turn's Mimi codes (encoded as the audio arrives) and its transcript.

This layer knows nothing of HTTP, sockets or the engine: it never imports `fastcsm.server`.
"""
