"""The model layer: CSM itself, from configuration to weights.

- `config.py`: `CsmConfig`, the shapes of csm-1b and of the tiny test presets;
- `network.py`: `CSM`, the Llama-style backbone and the depth decoder over Mimi's codebooks;
- `prompt.py`: the rows CSM reads (a text column beside one column per codebook), the tokenizer,
  `Segment`s of a conversation, and how they become rows;
- `context.py`: the model's window: whether rows fit, and trimming older context so they do;
- `checkpoints.py`: loading every published format (Sesame's, transformers', prequantized);
- `quant.py` and `kernels.py`: 8-bit linears and their kernels.

It imports torch and fastcsm's base modules (bounds, errors, nested) only: never the codec,
the engine, speech, the server or an integration.
"""
