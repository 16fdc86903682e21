"""The codec layer: Mimi, the streaming audio codec whose codes CSM speaks in.

- `mimi.py`: Mimi's encoder and decoder, with explicit streaming state so that a frame of codes
  becomes 80 ms of audio at once (and audio becomes codes for voices and the user's turns);
- `weights.py`: Mimi's weights from Kyutai's and transformers' checkpoints;
- `codec.py`: `Codec`, Mimi in CSM's row layout, loaded beside a CSM checkpoint or on its own.

It imports the model layer (checkpoint files) and fastcsm's base modules: never the engine,
speech, the server or an integration.
"""
