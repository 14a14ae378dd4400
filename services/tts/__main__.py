from services.tts.service import TtsService
from services.runtime.service import main

main(TtsService)
