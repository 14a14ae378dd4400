"""The voicebus bus contract: event types (``proto.events``), subject names
(``proto.subjects``) and the one codec (``proto.codec``).

``CONTRACT_VERSION`` changes whenever an event or a subject changes meaning; replicas announce
it in their discovery metadata and ``docs/architecture.md`` says what each version changed.
"""

CONTRACT_VERSION = 2
