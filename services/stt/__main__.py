from services.stt.service import SttService
from services.runtime.service import main

main(SttService)
