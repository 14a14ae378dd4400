from services.egress.service import EgressService
from services.runtime.service import main

main(EgressService)
