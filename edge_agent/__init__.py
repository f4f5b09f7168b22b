"""edge_agent: on-device Chinese wake-word spotting with an MQTT fleet agent."""

__version__ = "0.1.0"
