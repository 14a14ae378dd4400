"""The voicebus bus contract: event types (``proto.events``), subject names
(``proto.subjects``) and the one codec (``proto.codec``)."""
