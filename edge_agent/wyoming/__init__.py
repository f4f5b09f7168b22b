"""Home Assistant's Wyoming protocol: the agent as a wake-word service for Assist pipelines.

``server`` is the integration (the asyncio server on its own thread, routing detections to
clients), ``connection`` one client's events and stream, ``info`` the ``describe`` answer,
``advertise`` the mDNS announcement. Needs the ``wyoming`` extra (``wyoming``, ``zeroconf``).
"""
