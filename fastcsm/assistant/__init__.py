"""The assistant layer: what a conversation needs to answer a user with a language model.

- `llm`: a client of any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama,
  SGLang, OpenAI) through the official `openai` SDK; a reply is a cancellable stream of text.
- `speakable`: model output made fit to speak (no markdown, code, emoji or stage directions),
  streamed, and bounded in length.
- `history`: the conversation as the model sees it, keeping of an interrupted reply only what
  was heard.
- `turn`: `Assistant`, the driver of one user turn: history in, speakable pieces out, barge-in.

This layer knows nothing of audio, engines or sockets: it moves text. The conversation server
feeds its pieces to a streamed line and tells it how much of each was played.
"""

from .history import HeardPiece, History, heard_text
from .llm import LanguageModel, LLMConfig, LLMError, LLMStatusError, LLMStopped, LLMTimeout, LLMUnreachable, Reply
from .speakable import Speakable
from .turn import Assistant, PieceCutter, Turn

__all__ = ["Assistant", "HeardPiece", "History", "LLMConfig", "LLMError", "LLMStatusError", "LLMStopped",
           "LLMTimeout", "LLMUnreachable", "LanguageModel", "PieceCutter", "Reply", "Speakable", "Turn",
           "heard_text"]
