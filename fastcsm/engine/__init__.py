"""The engine layer: many streams generated at once, a frame at a time.

- `engine.py`: `Engine`, the slots (one stream each, the batch a dimension), the immutable
  `Request` beside each slot's own state, prefill, and the end reason of every stream;
- `step.py`: one frame for every slot: backbone, depth decoder, sampling and Mimi's decode;
- `sampling.py`: temperature, top-k and top-p, per row, without host syncs;
- `runner.py`: how the step runs (eager, compiled, CUDA graphs per batch bucket);
- `compile_cache.py`: compiled steps kept on disk between processes.

It imports the model and codec layers: never speech (text, voices, planning), the server or an
integration. Static shapes where graphs are captured; no host syncs inside a step.
"""
