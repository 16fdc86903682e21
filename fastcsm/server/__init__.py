"""fastcsm's HTTP and WebSocket service: `create_app(settings)` builds the FastAPI app.

protocol.py is the wire contract; app.py the routes; the scheduler (scheduler.py) owns
the engine in one background thread.
"""
