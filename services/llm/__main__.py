from services.llm.service import LlmService
from services.runtime.service import main

main(LlmService)
