"""Adapters for the frameworks voice agents are built with (each an optional extra):

- `fastcsm.integrations.pipecat`: `FastCSMTTSService`, a Pipecat TTS service over the
  `/v1/conversations` WebSocket (`pip install "fastcsm[pipecat]"`).
- `fastcsm.integrations.livekit`: `TTS`, a streaming LiveKit Agents TTS over the same WebSocket
  (`pip install "fastcsm[livekit]"`).
- `fastcsm.integrations.wyoming`: `fastcsm wyoming`, a Wyoming TTS service for Home Assistant
  (`pip install "fastcsm[wyoming]"`).
"""
