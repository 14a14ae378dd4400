"""voicebus services: one package per stage, sharing ``services.runtime``."""
